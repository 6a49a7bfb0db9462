"""Per-prompt selection: the best eligible trace by each metric, deterministically."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ln_ray.schema import SELECTIONS_SCHEMA

# Which way is better for each selection metric.
HIGHER_IS_BETTER = {"lalp": True, "galp": True, "rsr": False}


def select_prompt(group: pd.DataFrame, *, filter_correct: bool) -> pd.DataFrame:
    """Pick one trace per metric among a prompt's eligible candidates.

    Candidates are the prompt's scored traces (only those with ``correct == True`` when
    ``filter_correct``) whose metric is finite. Ties are broken by teacher name, then trace_id.

    Args:
        group: All scored traces of one prompt (scores/ columns).
        filter_correct: Keep only traces marked correct.

    Returns:
        Up to one row per metric, in ``SELECTIONS_SCHEMA`` columns; a metric with no candidate has
        no row.
    """
    eligible = group
    if filter_correct:
        eligible = group[group["correct"].fillna(False).astype(bool)]
    rows = []
    for metric, higher in HIGHER_IS_BETTER.items():
        values = pd.to_numeric(eligible[metric], errors="coerce")
        candidates = eligible[np.isfinite(values.to_numpy(dtype=float))]
        if candidates.empty:
            continue
        key = -candidates[metric] if higher else candidates[metric]
        ordered = candidates.assign(_key=key).sort_values(
            ["_key", "teacher", "trace_id"], kind="mergesort"
        )
        best = ordered.iloc[0]
        rows.append(
            {
                "prompt_id": best["prompt_id"],
                "metric": metric,
                "teacher": best["teacher"],
                "trace_id": best["trace_id"],
                "score": float(best[metric]),
                "n_candidates": len(candidates),
            }
        )
    return pd.DataFrame(rows, columns=SELECTIONS_SCHEMA.names)
