"""SmolLM2's scores of demo traces against the stored golden table (tests/golden/smollm2.py)."""

from __future__ import annotations

import json

import pytest

from ln_ray.score.version import SCORING_VERSION
from tests.golden.smollm2 import TABLE, compute, moved

pytestmark = pytest.mark.slow  # the real SmolLM2
REBLESS = ".venv/bin/python tests/golden/smollm2.py --bless"


def test_smollm2_scores_match_the_golden_table(smollm2):
    stored = json.loads(TABLE.read_text())
    assert stored.get("scoring_version") == SCORING_VERSION, (
        f"SCORING_VERSION is {SCORING_VERSION}, the golden table was blessed at "
        f"{stored.get('scoring_version')}: re-bless it ({REBLESS})"
    )
    problems = moved(stored, compute(smollm2))
    assert not problems, (
        "SmolLM2's golden numbers moved while SCORING_VERSION stayed "
        f"{SCORING_VERSION}:\n  " + "\n  ".join(problems) + "\nOnce the cause is understood "
        "(tests/reference.py still agrees with the scorer), bump SCORING_VERSION in "
        "ln_ray/score/version.py, so cached scores are never mixed with the new ones, and "
        f"re-bless the table ({REBLESS})."
    )


def test_the_table_stops_moved_numbers_at_an_unchanged_version():
    stored = json.loads(TABLE.read_text())
    shifted = json.loads(TABLE.read_text())
    shifted["traces"][0]["local_logprobs"][3] += 2e-4
    shifted["traces"][1]["global_ranks"][0] += 2
    assert moved(stored, stored) == []
    assert moved(stored, shifted) == [
        f"{stored['traces'][0]['teacher']}: local_logprobs moved by up to 2.00e-04",
        f"{stored['traces'][1]['teacher']}: 1 ranks moved",
    ]
