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
    and the Datasource in ln_ray/io/datasource.py)."""
    for folder in ("prepare", "score", "aggregate"):
        for path in (PACKAGE / folder).rglob("*.py"):
            text = path.read_text()
            assert "import ray" not in text and "from ray" not in text, _module_name(path)


def test_a_scoring_plan_needs_neither_torch_nor_transformers():
    code = "import sys, ln_ray.score.planning; "
    code += "print(sorted({'torch', 'transformers'} & {*sys.modules}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_planning_reading_shards_and_reading_a_published_run_need_no_ray():
    """``ln-ray plan`` and the readers of a finished run (report, summary) run without a
    cluster: only the job's own modules and the Datasource import Ray."""
    code = "import sys, ln_ray.plan, ln_ray.io.shards, ln_ray.io.run_folder, ln_ray.report; "
    code += "print(sorted({'ray', 'torch'} & {*sys.modules}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# The data flow, earliest first: what every layer may use is defined before it. Definitions
# (columns, what a score means), the per-row preparation, the config over them, storage, the
# scoring math, the aggregates; then the job's own modules in the order its data passes through
# them; then the commands around the job.
FLOW = (
    "ln_ray.schema",
    "ln_ray.score.version",
    "ln_ray.prepare",
    "ln_ray.config",
    "ln_ray.io",
    "ln_ray.score",
    "ln_ray.aggregate",
    "ln_ray.pipeline.ray_ops",  # the Ray toolbox every stage uses
    "ln_ray.pipeline.stages",  # per-row callables: validate, tokenize
    "ln_ray.pipeline.progress",
    "ln_ray.pipeline.display",  # the run's status line on a terminal
    "ln_ray.pipeline.score_stage",
    "ln_ray.pipeline.row_checks",  # rows grouped by a key: duplicates, conflicts
    "ln_ray.pipeline.lookup",  # the rows whose trace the score cache lacks
    "ln_ray.pipeline.passes",  # read + validate, tokenize + score
    "ln_ray.pipeline.assemble",
    "ln_ray.pipeline.accounting",
    "ln_ray.pipeline.curated",  # the curated set: selected rows with their text
    "ln_ray.pipeline.reduce",
    "ln_ray.pipeline.record",
    "ln_ray.pipeline.summary",
    "ln_ray.pipeline.job",
    "ln_ray.plan",
    "ln_ray.inspect_input",  # how an input will be read, from a sample
    "ln_ray.report_sample",  # what the report reads of the scores, bounded
    "ln_ray.report",
    "ln_ray.cli",
    "ln_ray.demo",
)


def _stage(module: str) -> int:
    """The position in ``FLOW`` of the longest entry that is ``module`` or holds it."""
    found = [i for i, name in enumerate(FLOW) if module == name or module.startswith(name + ".")]
    assert found, f"{module} has no place in FLOW"
    return max(found, key=lambda i: len(FLOW[i]))


def _later_imports(graph: dict[str, set[str]]) -> list[str]:
    skip = {"ln_ray", "ln_ray.pipeline", "ln_ray.io", "ln_ray.score", "ln_ray.prepare"}
    skip |= {"ln_ray.aggregate", "ln_ray.demo"}  # the packages' empty __init__ modules
    return [
        f"{module} imports {used}"
        for module, imports in sorted(graph.items())
        if module not in skip
        for used in sorted(imports - skip)
        if _stage(used) > _stage(module)
    ]


def test_no_module_imports_from_a_later_stage_of_the_data_flow():
    graph = _imports()
    assert _later_imports(graph) == []
    # The check finds one when there is one: storage reaching into the job.
    graph["ln_ray.io.cache"].add("ln_ray.pipeline.passes")
    assert _later_imports(graph) == ["ln_ray.io.cache imports ln_ray.pipeline.passes"]


def test_the_job_and_its_storage_read_in_modules_of_at_most_350_lines():
    long = {
        path.relative_to(REPO).as_posix(): lines
        for folder in ("pipeline", "io")
        for path in sorted((PACKAGE / folder).glob("*.py"))
        if (lines := len(path.read_text().splitlines())) > 350
    }
    assert long == {}
