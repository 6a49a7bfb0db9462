"""Golden numbers: SmolLM2-135M-Instruct's scores of a few demo traces, stored in smollm2.json.

The equivalence tests compare ln-ray's scorer with a reference computed in the same process, by
the same torch and transformers: an upgrade that moves both sides together (a changed kernel, a
changed default in the model code) would pass them. This table was computed once and is
compared within a stated tolerance (``tests/equivalence/test_golden.py``), so such a change
fails loudly.

The table records the scoring-semantics version it was blessed at (``SCORING_VERSION``, which
keys the score cache). Numbers that move mean cached scores would mix with new ones, so the test
fails unless the version was bumped too, and re-blessing refuses to record moved numbers under
the version that produced the old ones. After checking the cause of a difference
(tests/reference.py still agrees with the scorer, and the change is understood), bump
ln_ray/score/version.py and re-bless the table:

    .venv/bin/python tests/golden/smollm2.py --bless
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

TABLE = Path(__file__).with_name("smollm2.json")
DEMO = Path(__file__).resolve().parents[2] / "ln_ray" / "demo" / "traces.jsonl"
PROMPT = "demo-001"  # every teacher's trace of this prompt
WINDOW = 4
# Tolerances. Stored values are rounded to 1e-6; recomputing them on 1 or 2 threads moves a
# per-token log-prob by at most 1.4e-5 and a metric by at most 2e-6 (fp32 on a CPU), with every
# rank equal. The bounds are 7x and 10x those; a rank may move only by one place (two logits
# tying within that drift), at no more than two tokens of a trace.
LOGPROB_ATOL = 1e-4
METRIC_ATOL = 2e-5
RANK_SWAPS = 2
METRICS = (
    *("galp", "lalp", "lalp_drop1", "lalp_token", "ifd", "ifd_ppl"),
    *("rsr", "avg_rank", "avg_surprisal"),
)


def compute(student: Any) -> dict[str, Any]:
    """The golden entries: per demo trace, its tokens' log-probs and ranks and its metrics."""
    import copy

    from ln_ray.prepare.render import unconditional_context
    from ln_ray.prepare.rows import prepare_row
    from ln_ray.score.scorer import StudentScorer

    rows = [json.loads(line) for line in DEMO.read_text().splitlines()]
    rows = [row for row in rows if row["prompt_id"] == PROMPT]
    prepared = [prepare_row(row, student.tokenizer) for row in rows]
    model = copy.deepcopy(student.model)  # the scorer installs its attention into the model
    unconditional = unconditional_context(student.tokenizer)
    scorer = StudentScorer(model, window=WINDOW, unconditional=unconditional)
    scores = scorer.score([p.tokens for p in prepared])
    from ln_ray.score.version import SCORING_VERSION

    return {
        "student": "smollm2-135m",
        "scoring_version": SCORING_VERSION,
        "window": WINDOW,
        "traces": [
            {
                "teacher": row["teacher"],
                "n_tokens": score.n_tokens,
                "n_steps": score.n_steps,
                "global_logprobs": [round(float(x), 6) for x in score.global_logprobs],
                "global_ranks": [int(x) for x in score.global_ranks],
                "local_logprobs": [round(float(x), 6) for x in score.local_logprobs],
                **{name: round(float(getattr(score, name)), 6) for name in METRICS},
            }
            for row, score in zip(rows, scores, strict=True)
        ],
    }


def moved(stored: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """Where ``got`` differs from ``stored`` beyond the tolerances (empty: nothing moved)."""
    import numpy as np

    problems = []
    if got["window"] != stored["window"] or len(got["traces"]) != len(stored["traces"]):
        return ["the table's traces or window changed"]
    for want, have in zip(stored["traces"], got["traces"]):
        name = want["teacher"]
        if (have["teacher"], have["n_tokens"], have["n_steps"]) != (
            name,
            want["n_tokens"],
            want["n_steps"],
        ):
            problems.append(f"{name}: tokens or steps changed (the tokenizer or the template?)")
            continue
        for key in ("global_logprobs", "local_logprobs"):
            shift = float(np.abs(np.subtract(have[key], want[key])).max())
            if shift > LOGPROB_ATOL:
                problems.append(f"{name}: {key} moved by up to {shift:.2e}")
        ranks = np.subtract(have["global_ranks"], want["global_ranks"])
        if np.count_nonzero(ranks) > RANK_SWAPS or np.abs(ranks).max(initial=0) > 1:
            problems.append(f"{name}: {np.count_nonzero(ranks)} ranks moved")
        for metric in METRICS:
            shift = abs(have[metric] - want[metric])
            if shift > METRIC_ATOL:
                problems.append(f"{name}: {metric} moved by {shift:.2e}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bless", action="store_true", help="rewrite smollm2.json")
    args = parser.parse_args(argv)
    if not args.bless:
        parser.print_help()
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from ln_ray.config import StudentConfig
    from ln_ray.score.student import load_student

    table = compute(load_student(StudentConfig(model="smollm2-135m")))
    stored = json.loads(TABLE.read_text()) if TABLE.exists() else None
    if stored and stored.get("scoring_version") == table["scoring_version"]:
        problems = moved(stored, table)
        if problems:
            print(
                "the numbers moved at the same SCORING_VERSION: bump it in "
                "ln_ray/score/version.py first, then re-bless:\n  " + "\n  ".join(problems)
            )
            return 1
    TABLE.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {TABLE} ({len(table['traces'])} traces)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
