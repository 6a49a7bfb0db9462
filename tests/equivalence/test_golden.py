"""SmolLM2's scores of demo traces against the stored golden table (tests/golden/smollm2.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.golden.smollm2 import LOGPROB_ATOL, METRIC_ATOL, RANK_AGREEMENT, TABLE, compute

pytestmark = pytest.mark.slow  # the real SmolLM2
METRICS = ("galp", "lalp", "lalp_token", "rsr", "avg_rank", "avg_surprisal")
REBLESS = (
    "SmolLM2's golden numbers moved. If the cause is understood (a library upgrade, and "
    "tests/reference.py still agrees with the scorer), re-bless the table: "
    ".venv/bin/python tests/golden/smollm2.py --bless"
)


def test_smollm2_scores_match_the_golden_table(smollm2):
    stored = json.loads(TABLE.read_text())
    got = compute(smollm2)
    assert got["window"] == stored["window"]
    for want, have in zip(stored["traces"], got["traces"], strict=True):
        name = want["teacher"]
        assert (have["teacher"], have["n_tokens"], have["n_steps"]) == (
            name,
            want["n_tokens"],
            want["n_steps"],
        ), f"{name}: tokens or steps changed (the tokenizer or the template?). {REBLESS}"
        for key in ("global_logprobs", "local_logprobs"):
            moved = np.abs(np.subtract(have[key], want[key])).max()
            assert moved <= LOGPROB_ATOL, f"{name}: {key} moved by up to {moved:.2e}. {REBLESS}"
        same = np.mean(np.equal(have["global_ranks"], want["global_ranks"]))
        assert same >= RANK_AGREEMENT, f"{name}: only {same:.1%} of ranks agree. {REBLESS}"
        for metric in METRICS:
            moved = abs(have[metric] - want[metric])
            assert moved <= METRIC_ATOL, f"{name}: {metric} moved by {moved:.2e}. {REBLESS}"
