"""Human-readable end-of-run summary: counts, throughput and the teacher table."""

from __future__ import annotations

from typing import Any

import pandas as pd

_METRIC_TITLES = {
    "lalp": "lalp (local naturalness, higher is better)",
    "galp": "galp (global log-prob, higher is better)",
    "rsr": "rsr (rank-surprisal ratio, per-trace mean, lower is better)",
    "rsr_dataset": "rsr_dataset (sum of ranks / sum of surprisals, lower is better)",
}


def format_teacher_table(table: pd.DataFrame, confidence: float = 0.95) -> str:
    """The teacher table, one block per metric, best first."""
    lines = []
    for metric in [m for m in _METRIC_TITLES if m in set(table["metric"])]:
        part = table[table["metric"] == metric].sort_values("rank")
        width = max(7, *(len(t) for t in part["teacher"]))
        lines.append(f"Teachers by {_METRIC_TITLES[metric]}")
        lines.append(
            f"  {'rank':>4}  {'teacher':<{width}}  {'mean':>9}  "
            f"{f'{confidence:.0%} CI':^21}  {'traces':>6}  {'wins':>5}"
        )
        for row in part.itertuples():
            ci = f"[{row.ci_low:9.4f}, {row.ci_high:9.4f}]"
            lines.append(
                f"  {row.rank:>4}  {row.teacher:<{width}}  {row.mean:9.4f}  {ci:>21}  "
                f"{row.count:>6}  {row.wins:>5}"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def format_summary(manifest: dict[str, Any], table: pd.DataFrame) -> str:
    """Counts, throughput and the teacher table of a finished run."""
    counts = manifest.get("counts", {})
    timings = manifest.get("timings", {})
    speed = manifest.get("throughput", {})
    selection = manifest.get("selection", {})
    reasons = manifest.get("reject_reasons", {})
    lines = [
        f"ln-ray run {manifest.get('run_id', '?')}  student {manifest['student']['identity']}",
        f"  rows read {counts.get('rows_read', 0)}: scored {counts.get('rows_scored', 0)}, "
        f"rejected {counts.get('rows_rejected', 0)}  ({len(manifest.get('inputs', []))} files)",
        *(
            [f"  rejected by reason: {', '.join(f'{k} {v}' for k, v in reasons.items())}"]
            if reasons
            else []
        ),
        f"  tokens scored {counts.get('tokens_scored', 0)} "
        f"(new traces this run: {counts.get('traces_scored_now', 0)}, "
        f"{speed.get('tokens_per_s', 0):.0f} tokens/s, "
        f"{speed.get('model_tokens_per_s', 0):.0f} model tokens/s)",
        f"  prompts {selection.get('prompts', 0)}, selected {selection.get('prompts_selected', 0)}"
        f" (filtered on correct: {selection.get('filtered_on_correct', False)})",
        f"  time: scoring {timings.get('score_s', 0):.1f}s, "
        f"reduce {timings.get('reduce_s', 0):.1f}s, total {timings.get('total_s', 0):.1f}s",
        "",
        format_teacher_table(table, selection.get("confidence", 0.95)),
    ]
    return "\n".join(lines)
