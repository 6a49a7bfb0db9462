"""Human-readable end-of-run summary: counts, throughput and the teacher table."""

from __future__ import annotations

import re
from typing import Any

import pandas as pd

from ln_ray.io.manifest import RunManifest
from ln_ray.schema import SHARED_PROMPT_ID, better_direction

_METRIC_NAMES = {
    "lalp": "local naturalness",
    "lalp_drop1": "local naturalness without each step's first token",
    "galp": "global log-prob",
    "lalp_token": "local log-prob per token",
    "ifd": "instruction-following difficulty, loss ratio",
    "ifd_ppl": "instruction-following difficulty, perplexity ratio",
    "rsr": "rank-surprisal ratio, per-trace mean",
    "rsr_dataset": "sum of ranks / sum of surprisals",
    "avg_rank": "mean token rank",
    "avg_surprisal": "mean token surprisal",
}
_METRIC_TITLES = {
    metric: f"{metric} ({name}, {better_direction(metric)} is better)"
    for metric, name in _METRIC_NAMES.items()
}


# Control characters (C0 but tab and newline, DEL, C1): a terminal acts on them (colours, cursor
# moves, a cleared screen), so names and text from the input show them escaped.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: Any) -> str:
    """``text`` with every control character shown as an escape (``\\x1b``), so a teacher name
    or prompt id from the input prints as the text it is."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", str(text))


def format_teacher_table(
    table: pd.DataFrame,
    confidence: float = 0.95,
    pairs: pd.DataFrame | None = None,
    stability: dict[str, Any] | None = None,
) -> str:
    """The teacher table, one block per metric, best first; under each, the pairs of teachers
    the paired comparison tells apart and those it does not, and whether the prompts settle the
    ranking."""
    lines = []
    table = table.assign(teacher=table["teacher"].map(printable)) if len(table) else table
    if pairs is not None and len(pairs):
        pairs = pairs.assign(
            teacher_a=pairs["teacher_a"].map(printable), teacher_b=pairs["teacher_b"].map(printable)
        )
    for metric in [m for m in _METRIC_TITLES if m in set(table["metric"])]:
        part = table[table["metric"] == metric].sort_values("rank")
        width = max(7, *(len(t) for t in part["teacher"]))
        lines.append(f"Teachers by {_METRIC_TITLES[metric]}")
        lines.append(
            f"  {'rank':>4}  {'teacher':<{width}}  {'mean':>9}  "
            f"{f'{confidence:.0%} CI':^21}  {'traces':>6}  {'wins':>5}  apart from next"
        )
        for row in part.itertuples():
            ci = f"[{row.ci_low:9.4f}, {row.ci_high:9.4f}]"
            wins = "-" if pd.isna(row.wins) else f"{int(row.wins)}"
            apart = yes_no(getattr(row, "separated_from_next", None))
            lines.append(
                f"  {row.rank:>4}  {row.teacher:<{width}}  {row.mean:9.4f}  {ci:>21}  "
                f"{row.count:>6}  {wins:>5}  {apart}"
            )
        if pairs is not None and len(pairs):
            lines.extend(_pair_lines(part, pairs[pairs["metric"] == metric], confidence))
        statement = (stability or {}).get(metric, {}).get("statement")
        if statement:
            lines.append(f"  {statement[0].upper()}{statement[1:]}.")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def overview(table: pd.DataFrame) -> pd.DataFrame:
    """Teachers x metrics: each teacher's rank by each metric, ``1 >`` where the paired
    comparison tells it apart from the next-ranked teacher. Teachers in their order by lalp
    (else by the first metric), metrics in the teacher table's order."""
    metrics = [m for m in _METRIC_TITLES if m in set(table["metric"])]
    if not metrics:
        return pd.DataFrame()
    first = table[table["metric"] == metrics[0]].sort_values(["rank", "teacher"])
    cells = pd.DataFrame(index=list(first["teacher"]), columns=metrics, dtype=object)
    for row in table[table["metric"].isin(metrics)].itertuples():
        apart = getattr(row, "separated_from_next", None)
        told = apart is not None and not pd.isna(apart) and bool(apart)
        cells.loc[row.teacher, row.metric] = f"{row.rank}{' >' if told else ''}"
    return cells.fillna("-")


def agreement_shares(counts: list[dict[str, Any]] | None) -> list[tuple[str, str, float]]:
    """(metric, other, share of prompts where both select the same trace), each pair once."""
    shares = []
    for entry in counts or []:
        if entry["metric"] < entry["other"] and entry["prompts"]:
            shares.append((entry["metric"], entry["other"], entry["same"] / entry["prompts"]))
    return sorted(shares)


def format_overview(table: pd.DataFrame, agreement: list[dict[str, Any]] | None) -> str:
    """One view of the teachers: their rank by every metric, which neighbours the paired
    comparison tells apart, and how often the selection metrics pick the same trace."""
    cells = overview(table)
    if cells.empty:
        return "Overview: no teacher was ranked in this run.\n"
    names = [printable(t) for t in cells.index]
    width = max(7, *(len(n) for n in names))
    columns = [max(len(m), 4) for m in cells.columns]
    lines = [
        "Overview: each teacher's rank by each metric ('>': told apart from the next teacher)",
        (
            f"  {'teacher':<{width}}  "
            + "  ".join(f"{m:<{w}}" for m, w in zip(cells.columns, columns))
        ).rstrip(),
    ]
    for name, (_, row) in zip(names, cells.iterrows()):
        ranks = "  ".join(f"{str(v):<{w}}" for v, w in zip(row, columns))
        lines.append(f"  {name:<{width}}  {ranks}".rstrip())
    shares = agreement_shares(agreement)
    if shares:
        lines.append(
            "  The selections agree (same trace for a prompt): "
            + ", ".join(f"{a} and {b} {share:.0%}" for a, b, share in shares)
        )
    return "\n".join(lines) + "\n"


def yes_no(value: Any) -> str:
    """A nullable flag as a table cell: yes, no, or empty when null."""
    return "" if value is None or pd.isna(value) else ("yes" if value else "no")


def _pair_lines(ranked: pd.DataFrame, pairs: pd.DataFrame, confidence: float) -> list[str]:
    """Each pair once, the better-ranked teacher first: separated pairs, then the rest."""
    rank = dict(zip(ranked["teacher"], ranked["rank"]))
    shown = pairs[
        pairs["teacher_a"].map(rank).fillna(1e9) < pairs["teacher_b"].map(rank).fillna(1e9)
    ].sort_values(["teacher_a", "teacher_b"], key=lambda s: s.map(rank))

    def describe(row) -> str:
        return (
            f"{row.teacher_a} vs {row.teacher_b}: {row.mean_diff:+.4f} "
            f"[{row.ci_low:+.4f}, {row.ci_high:+.4f}], {row.teacher_a} better on "
            f"{row.win_rate:.0%} of {row.n_prompts} shared prompts"
        )

    lines = []
    for separated, title in ((True, "told apart"), (False, "not told apart")):
        chosen = shown[shown["separated"] == separated]
        if len(chosen):
            lines.append(f"  Pairs {title} (paired {confidence:.0%} CI of the difference):")
            lines.extend(f"    {describe(row)}" for row in chosen.itertuples())
    return lines


def _proof_lines(proof: dict[str, Any] | None) -> list[str]:
    """How the student was proven, in one line (nothing for a run before proofs existed)."""
    if not proof:
        return []
    check = proof.get("self_check")
    line = f"  student proven by {proof['proven_by']} (model type {proof['model_type']}"
    if check:
        line += (
            f"; self-check: largest log-prob difference {check['max_difference']:.2g}, "
            f"tolerance {check['tolerance']:g} in {check['dtype']}"
        )
    return [line + ")"]


def format_summary(
    manifest: RunManifest, table: pd.DataFrame, pairs: pd.DataFrame | None = None
) -> str:
    """Counts, throughput and the teacher table of a finished run (with its paired
    comparisons, ``teacher_pairs/``, when given)."""
    counts, timings, speed = manifest.counts, manifest.timings, manifest.throughput
    selection, reasons, kinds = manifest.selection, manifest.reject_reasons, manifest.reject_kinds
    shared = reasons.get(SHARED_PROMPT_ID, 0)
    lines = [
        f"ln-ray run {manifest.run_id or '?'}  student {manifest.student['identity']}",
        *_proof_lines(manifest.student.get("proof")),
        f"  rows read {counts.get('rows_read', 0)}: scored {counts.get('rows_scored', 0)}, "
        f"rejected {counts.get('rows_rejected', 0)}  ({len(manifest.inputs)} files)",
        *(
            [f"  rejected by kind: {', '.join(f'{k} {v}' for k, v in kinds.items())}"]
            if kinds
            else []
        ),
        *(
            [f"  rejected by reason: {', '.join(f'{k} {v}' for k, v in reasons.items())}"]
            if reasons
            else []
        ),
        *(
            [
                f"  {shared} rows share a prompt_id with rows of another prompt: rejected, "
                "never merged (rejects/ names both sources)"
            ]
            if shared
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
        format_overview(table, selection.get("agreement")),
        "In detail, metric by metric:",
        "",
        format_teacher_table(
            table, selection.get("confidence", 0.95), pairs, selection.get("stability")
        ),
    ]
    return "\n".join(lines)
