"""``ln-ray report``: one self-contained HTML page (PNG figures inlined) about a finished run.

It shows the teacher table per metric with confidence intervals, the paired comparison of every
two teachers (mean difference and win rate over shared prompts, pairs told apart marked), how
many prompts the ranking needs (its stability on random subsets), each teacher's distribution of
lalp, lalp_drop1, galp and rsr, how often each teacher wins per metric, how often the metrics
agree on the selected trace, and the traces whose local and global scores disagree most, with
their least natural steps highlighted.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from ln_ray.aggregate.select import SELECTED_BY, agreement_counts
from ln_ray.io.manifest import ROWS_DIR, RunManifest
from ln_ray.io.run_folder import OutputError, OutputRoot, PublishedRun
from ln_ray.pipeline.summary import overview, printable, yes_no
from ln_ray.report_sample import SAMPLE_PER_TEACHER, ScoresView, read_scores
from ln_ray.schema import better_direction

METRICS = SELECTED_BY  # the metrics traces are selected by
REPORT_NAME = "report.html"
_DISAGREEMENTS = 5
_HIGHLIGHTED_STEPS = 3


def write_report(output_path: str) -> str:
    """Render the report of the run under ``output_path``; returns the page's URL."""
    run = load_run(output_path)
    page = render_report(run)
    root = OutputRoot(output_path)
    with root.open(REPORT_NAME, "w", encoding="utf-8") as handle:
        handle.write(page)
    return root.url_of(REPORT_NAME)


def load_run(output_path: str) -> dict[str, Any]:
    """What the report shows of the run published under ``output_path``: its manifest, its
    teacher-level tables, what it reads of the scores in bounded memory (``report_sample``) and
    how often the metrics agree; the text of the few traces the report shows is read when it is
    rendered (``shown_traces``). Nothing is read whole that grows with traces or prompts."""
    try:
        published = PublishedRun.open(output_path)
    except OutputError as exc:
        raise FileNotFoundError(str(exc)) from None
    table = published.table
    return {
        "published": published,
        "manifest": published.manifest,
        "scores": read_scores(published, _DISAGREEMENTS),
        "agreement": run_agreement(published),
        "teachers": table("teachers"),
        "pairs": table("teacher_pairs"),
        "stability": table("teacher_stability"),
    }


def shown_traces(published: PublishedRun, trace_ids: list[str]) -> pd.DataFrame:
    """Messages, step boundaries and step log-probs of the traces ``trace_ids`` (by trace_id),
    read with a filter on trace_id: never the whole run's text."""
    if not trace_ids:
        return pd.DataFrame(columns=["trace_id", "step_logprobs", "step_chars", "messages"])
    where = [("trace_id", "in", list(trace_ids))]
    parts = [
        published.table("scores", ["trace_id", "step_logprobs"], where),
        published.table(ROWS_DIR, ["trace_id", "step_chars"], where),
        published.table(published.manifest.text_output, ["trace_id", "messages"], where),
    ]
    shown = parts[0].drop_duplicates("trace_id")
    for part in parts[1:]:
        shown = shown.merge(part.drop_duplicates("trace_id"), on="trace_id")
    return shown


def render_report(run: dict[str, Any]) -> str:
    """The HTML page for a loaded run."""
    import matplotlib

    matplotlib.use("Agg")
    # Teacher names are input: ``$...$`` in one is text, not mathtext to typeset (or fail on).
    with matplotlib.rc_context({"text.parse_math": False}):
        return _render(run)


def _render(run: dict[str, Any]) -> str:
    manifest, scores, teachers = run["manifest"], run["scores"], run["teachers"]
    order = (
        teachers[teachers["metric"] == "lalp"].sort_values("rank")["teacher"].tolist()
        or scores.teachers
    )
    nothing = "<p>No trace was scored in this run: <code>rejects/</code> says why.</p>"
    sections = _sections(run, order) if scores.traces else [_section("Teachers", nothing)]
    counts = manifest.counts
    header = (
        f"<p>Run <code>{_e(manifest.run_id)}</code>, student "
        f"<code>{_e(manifest.student['identity'])}</code>, finished "
        f"{_e(manifest.finished_at)}. Rows read {counts.get('rows_read', 0)}, "
        f"scored {counts.get('rows_scored', 0)}, rejected {counts.get('rows_rejected', 0)}; "
        f"{manifest.selection.get('prompts', 0)} prompts.</p>"
    )
    return _PAGE.format(body=header + "".join(sections))


def _sections(run: dict[str, Any], order: list[str]) -> list[str]:
    scores, agreement, teachers = run["scores"], run["agreement"], run["teachers"]
    sampled = (
        f"Per-trace lalp, lalp_drop1, galp and rsr by teacher (a sample of up to "
        f"{SAMPLE_PER_TEACHER:,} traces per teacher, of {scores.traces:,})"
    )
    return [
        _section(
            "Overview",
            _overview(teachers, agreement)
            + _figure(
                _plot_overview(overview(teachers)),
                "Each teacher's rank by each metric (1 is best); '>' marks a teacher told apart "
                "from the next by the paired comparison",
            ),
            anchor="overview",
        ),
        _details(
            "Teachers",
            _teacher_tables(teachers)
            + _figure(_plot_teachers(teachers, order), "Mean per teacher with its bootstrap CI"),
        ),
        _details(
            "Is one teacher better than another?",
            _pair_matrices(run["pairs"], order, run["manifest"]),
        ),
        _details(
            "How many prompts the ranking needs",
            _stability(run["stability"], run["manifest"]),
        ),
        _details(
            "Score distributions",
            _figure(_plot_distributions(scores.sample, order, _ranked(teachers)), sampled),
        ),
        _details(
            "Wins",
            _figure(_plot_wins(teachers, order), "Share of prompts won, per metric"),
        ),
        _details(
            "Do the metrics agree?",
            _agreement_table(agreement)
            + _figure(_plot_agreement(agreement), "Share of prompts where two metrics agree"),
        ),
        _details("Where local and global disagree most", _disagreements(scores, run["published"])),
    ]


def _overview(teachers: pd.DataFrame, agreement: pd.DataFrame) -> str:
    """The teachers x metrics ranks, with the neighbours told apart, and the selections'
    agreement in a sentence."""
    cells = overview(teachers)
    head = "".join(f"<th>{_e(metric)}</th>" for metric in cells.columns)
    rows = "".join(
        f"<tr><td>{_e(teacher)}</td>"
        + "".join(
            f"<td title='told apart from the next teacher'>{_e(v)}</td>"
            if str(v).endswith(">")
            else f"<td>{_e(v)}</td>"
            for v in row
        )
        + "</tr>"
        for teacher, row in cells.iterrows()
    )
    pairs = [
        f"{a} and {b} pick the same trace for {agreement.loc[a, b]:.0%} of prompts"
        for i, a in enumerate(agreement.index)
        for b in agreement.columns[i + 1 :]
        if not pd.isna(agreement.loc[a, b])
    ]
    said = f"<p>The selection metrics agree: {_e('; '.join(pairs))}.</p>" if pairs else ""
    return (
        "<p>Each teacher's rank by each metric (1 is best; '&gt;': the paired comparison tells "
        "it apart from the next teacher). The sections below give the details.</p>"
        f"<table class='overview'><tr><th>teacher</th>{head}</tr>{rows}</table>{said}"
    )


def run_agreement(published: PublishedRun) -> pd.DataFrame:
    """For each pair of metrics, the share of prompts (selected by both) with the same trace.

    The reduce stage counts them in Ray (the manifest's ``selection.agreement``); for a run that
    predates those counts, they are counted here from its selections, read whole.
    """
    counts = published.manifest.selection.get("agreement")
    if counts is None:
        selections = published.table("selections", ["prompt_id", "metric", "trace_id"])
        counts = agreement_counts(pa.Table.from_pandas(selections, preserve_index=False))
        counts = counts.to_pylist()
    return metric_agreement(counts)


def metric_agreement(counts: list[dict[str, Any]]) -> pd.DataFrame:
    """The shares of ``counts`` (``AGREEMENT_SCHEMA`` rows) as a metrics x metrics frame (NaN
    where no prompt has both), over the metrics that selected a trace for some prompt."""
    chosen = {e["metric"] for e in counts if e["prompts"]} | {
        e["other"] for e in counts if e["prompts"]
    }
    metrics = [m for m in METRICS if m in chosen]
    shares = pd.DataFrame(index=metrics, columns=metrics, dtype=float)
    for entry in counts:
        if entry["metric"] in metrics and entry["other"] in metrics:
            share = entry["same"] / entry["prompts"] if entry["prompts"] else np.nan
            shares.loc[entry["metric"], entry["other"]] = share
    return shares


def _teacher_tables(teachers: pd.DataFrame) -> str:
    parts = []
    ordered = [*_ranked(teachers), *sorted(set(teachers["metric"]) - set(METRICS))]
    for metric in ordered:
        part = teachers[teachers["metric"] == metric]
        rows = "".join(
            f"<tr><td>{r.rank}</td><td>{_e(r.teacher)}</td><td>{r.mean:.4f}</td>"
            f"<td>[{r.ci_low:.4f}, {r.ci_high:.4f}]</td><td>{r.count}</td>"
            f"<td>{'-' if pd.isna(r.wins) else int(r.wins)}</td>"
            f"<td>{yes_no(getattr(r, 'separated_from_next', None))}</td></tr>"
            for r in part.sort_values("rank").itertuples()
        )
        better = part["better"].iloc[0] if "better" in part and len(part) else ""
        parts.append(
            f"<h3>{_e(metric)} <small>({_e(better)} is better)</small></h3><table><tr>"
            f"<th>rank</th><th>teacher</th><th>mean</th><th>CI</th><th>traces</th><th>wins</th>"
            f"<th>apart from next</th></tr>{rows}</table>"
        )
    return "".join(parts)


def _pair_matrices(pairs: pd.DataFrame, order: list[str], manifest: RunManifest) -> str:
    """Per metric, a teachers x teachers matrix: the row teacher's mean difference from the
    column teacher and its win rate over their shared prompts; pairs told apart in bold."""
    if pairs.empty:
        return "<p>No paired comparisons in this run (fewer than two teachers).</p>"
    confidence = manifest.selection.get("confidence", 0.95)
    parts = [
        f"<p>Each cell compares the row teacher with the column teacher on the prompts both "
        f"answered: the mean difference of their per-prompt values (row minus column, in the "
        f"metric's own direction) and the share of those prompts where the row teacher is "
        f"better. <b>Bold</b>: the paired {confidence:.0%} interval of the difference excludes "
        f"zero, so the two are told apart.</p>"
    ]
    for metric in pairs["metric"].drop_duplicates():
        part = pairs[pairs["metric"] == metric].set_index(["teacher_a", "teacher_b"])
        cells = []
        for a in order:
            row = [f"<th>{_e(a)}</th>"]
            for b in order:
                if (a, b) not in part.index:
                    row.append("<td></td>")
                    continue
                pair = part.loc[(a, b)]
                text = (
                    f"{pair['mean_diff']:+.4f}<br><small>[{pair['ci_low']:+.4f}, "
                    f"{pair['ci_high']:+.4f}]</small><br>wins {pair['win_rate']:.0%} of "
                    f"{int(pair['n_prompts'])}"
                )
                row.append(f"<td>{f'<b>{text}</b>' if pair['separated'] else text}</td>")
            cells.append(f"<tr>{''.join(row)}</tr>")
        head = "".join(f"<th>{_e(b)}</th>" for b in order)
        parts.append(
            f"<h3>{_e(metric)}</h3><table><tr><th></th>{head}</tr>{''.join(cells)}</table>"
        )
    return "".join(parts)


def _stability(curve: pd.DataFrame, manifest: RunManifest) -> str:
    if curve.empty:
        return "<p>No stability curve in this run.</p>"
    statements = manifest.selection.get("stability", {})
    items = "".join(
        f"<li>{_e(entry['statement'])}</li>"
        for entry in statements.values()
        if entry.get("statement")
    )
    return (
        "<p>How often the teachers' ranking on random subsets of n prompts equals the ranking "
        "on all of them. Where the curve reaches the top well before your number of prompts, "
        "more prompts would not change the order; where it reaches it only at the end, they "
        f"might.</p><ul>{items}</ul>"
        + _figure(_plot_stability(curve), "Share of random prompt subsets giving the full ranking")
    )


def _plot_stability(curve: pd.DataFrame):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    for metric, part in curve.groupby("metric", sort=False):
        ax.plot(part["n_prompts"], part["agreement"], marker="o", label=metric)
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("prompts in the subset")
    ax.set_ylabel("share giving the full ranking")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    return fig


def _agreement_table(shares: pd.DataFrame) -> str:
    head = "".join(f"<th>{m}</th>" for m in shares.columns)
    body = "".join(
        f"<tr><th>{a}</th>"
        + "".join(f"<td>{shares.loc[a, b]:.0%}</td>" for b in shares.columns)
        + "</tr>"
        for a in shares.index
    )
    return f"<table><tr><th></th>{head}</tr>{body}</table>"


def _disagreements(scores: ScoresView, published: PublishedRun) -> str:
    chosen = scores.disagreements
    texts = shown_traces(published, chosen["trace_id"].tolist()).set_index("trace_id")
    parts = [
        "<p>Least natural steps (lowest local log-prob) are highlighted; hover for values.</p>"
    ]
    for trace in chosen.itertuples():
        shown = texts.loc[trace.trace_id]
        messages = json.loads(shown["messages"])
        response = messages[-1]["content"]
        prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        parts.append(
            f"<div class='trace'><p><b>{_e(trace.teacher)}</b> on <code>{_e(trace.prompt_id)}"
            f"</code>: lalp {trace.lalp:.3f}, galp {trace.galp:.3f} (z-gap {trace.gap:+.2f})</p>"
            f"<p class='prompt'>{_e(prompt)}</p>"
            f"<pre>{_highlight(response, list(shown['step_chars']), list(shown['step_logprobs']))}"
            "</pre></div>"
        )
    return "".join(parts)


def _highlight(response: str, step_chars: list[int], step_logprobs: list[float | None]) -> str:
    scored = [(lp, i) for i, lp in enumerate(step_logprobs) if lp is not None and np.isfinite(lp)]
    worst = {i for _, i in sorted(scored)[:_HIGHLIGHTED_STEPS]}
    out, start = [], 0
    for i, length in enumerate(step_chars):
        text = _e(response[start : start + length])
        start += length
        lp = step_logprobs[i] if i < len(step_logprobs) else None
        title = f"step {i + 1}: " + ("no tokens" if lp is None else f"log-prob {lp:.3f}")
        tag = "mark" if i in worst else "span"
        out.append(f"<{tag} title='{title}'>{text}</{tag}>")
    return "".join(out) + _e(response[start:])


def _ranked(teachers: pd.DataFrame) -> list[str]:
    """The selection metrics the teacher table ranks (a metric no trace has, as ``ifd`` with
    ``scoring.ifd=false``, has no rows there and no plot here)."""
    present = set(teachers["metric"])
    return [m for m in METRICS if m in present] or list(METRICS)


def _plot_teachers(teachers: pd.DataFrame, order: list[str]):
    import matplotlib.pyplot as plt

    metrics = _ranked(teachers)
    fig, axes = plt.subplots(1, len(metrics), figsize=(12, 0.5 * len(order) + 1.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        part = teachers[teachers["metric"] == metric].set_index("teacher").reindex(order)
        y = np.arange(len(order))
        err = np.vstack([part["mean"] - part["ci_low"], part["ci_high"] - part["mean"]])
        ax.errorbar(part["mean"], y, xerr=np.nan_to_num(err), fmt="o", capsize=4)
        ax.set_yticks(y, [printable(t) for t in order])
        ax.invert_yaxis()
        ax.set_title(f"{metric} ({better_direction(metric)} is better)")
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def _plot_distributions(scores: pd.DataFrame, order: list[str], metrics: list[str]):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(12, 0.5 * len(order) + 1.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        data = [scores.loc[scores["teacher"] == t, metric].dropna().to_numpy() for t in order]
        ax.boxplot(data, orientation="horizontal", tick_labels=[printable(t) for t in order])
        ax.invert_yaxis()
        ax.set_title(metric)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def _plot_overview(cells: pd.DataFrame):
    import matplotlib.pyplot as plt

    ranks = cells.map(lambda v: float(str(v).split()[0]) if str(v)[0].isdigit() else np.nan)
    fig, ax = plt.subplots(figsize=(1.1 * len(cells.columns) + 2.5, 0.45 * len(cells) + 1.2))
    ax.imshow(ranks.to_numpy(dtype=float), cmap="RdYlGn_r", aspect="auto", alpha=0.55)
    ax.set_xticks(range(len(cells.columns)), cells.columns, rotation=20, ha="right")
    ax.set_yticks(range(len(cells.index)), [printable(t) for t in cells.index])
    for i in range(len(cells.index)):
        for j in range(len(cells.columns)):
            ax.text(j, i, str(cells.iloc[i, j]), ha="center", va="center")
    fig.tight_layout()
    return fig


def _plot_wins(teachers: pd.DataFrame, order: list[str]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2))
    metrics = _ranked(teachers)
    width = 0.8 / len(metrics)
    x = np.arange(len(order))
    for k, metric in enumerate(metrics):
        part = teachers[teachers["metric"] == metric].set_index("teacher")["wins"]
        wins = part.reindex(order).fillna(0).astype(float)
        share = wins / max(wins.sum(), 1)
        ax.bar(x + (k - (len(metrics) - 1) / 2) * width, share.to_numpy(), width, label=metric)
    ax.set_xticks(x, [printable(t) for t in order], rotation=20, ha="right")
    ax.set_ylabel("share of prompts won")
    ax.legend()
    fig.tight_layout()
    return fig


def _plot_agreement(shares: pd.DataFrame):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.8, 3.2))
    image = ax.imshow(shares.to_numpy(dtype=float), vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(shares.columns)), shares.columns)
    ax.set_yticks(range(len(shares.index)), shares.index)
    for i in range(len(shares.index)):
        for j in range(len(shares.columns)):
            ax.text(j, i, f"{shares.iloc[i, j]:.0%}", ha="center", va="center", color="w")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def _figure(fig, caption: str) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (
        f"<figure><img alt='{_e(caption)}' src='data:image/png;base64,{data}'>"
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _section(title: str, body: str, anchor: str = "") -> str:
    where = f" id='{anchor}'" if anchor else ""
    return f"<section{where}><h2>{_e(title)}</h2>{body}</section>"


def _details(title: str, body: str) -> str:
    """A section folded in the page: its title shows, its body opens on a click."""
    return f"<details><summary><h2>{_e(title)}</h2></summary>{body}</details>"


def _e(text: Any) -> str:
    """Input text (a teacher name, a trace) as HTML text: markup escaped, control characters
    shown as escapes."""
    return html.escape(printable(text), quote=True)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ln-ray report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
td:nth-child(2) {{ text-align: left; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; }}
details > summary {{ cursor: pointer; }} details > summary h2 {{ display: inline; }}
details {{ margin: 1em 0; }} .overview td {{ text-align: center; }}
.overview td:first-child {{ text-align: left; }}
pre {{ white-space: pre-wrap; background: #f7f7f7; padding: 0.8em; }}
mark {{ background: #ffb3a7; }}
.trace {{ border-top: 1px solid #ddd; margin-top: 1em; }} .prompt {{ color: #555; }}
</style></head>
<body><h1>ln-ray report</h1>
{body}
</body></html>
"""
