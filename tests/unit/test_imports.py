"""How the package's modules depend on each other: no import cycles (function-level imports
included), no Ray in the scoring math, and a scoring plan that needs no torch."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.helpers import REPO

PACKAGE = REPO / "ln_ray"


def _module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every ln_ray module and the ln_ray modules it imports, anywhere in its body."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            else:
                continue
            graph[name].update(m for m in found if m in modules and m != name)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle in ``graph``, as the modules along it, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_takes_part_in_an_import_cycle():
    graph = _imports()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])
    # The check finds one when there is one.
    graph["ln_ray.score.vetting"].add("ln_ray.score.scorer")
    assert _cycle(graph) is not None


def test_preparing_scoring_and_aggregating_never_import_ray():
    """The math runs, and is tested, in-process; Ray is the executor around it (ln_ray/pipeline,
    and the Datasource in ln_ray/io/shards.py)."""
    for folder in ("prepare", "score", "aggregate"):
        for path in (PACKAGE / folder).rglob("*.py"):
            text = path.read_text()
            assert "import ray" not in text and "from ray" not in text, _module_name(path)


def test_a_scoring_plan_needs_neither_torch_nor_transformers():
    code = "import sys, ln_ray.score.planning; "
    code += "print(sorted({'torch', 'transformers'} & {*sys.modules}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
