"""Row validation and trace identity (ln_ray/prepare/rows.py)."""

from __future__ import annotations

import pytest

from ln_ray.prepare.rows import RowRejected, trace_id, validate_row
from tests.helpers import TOTAL_RESPONSE, TOTAL_ROW


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"teacher": None}, "missing teacher"),
        ({"prompt": 3}, "prompt is not a string"),
        ({"response": "   "}, "empty response"),
        ({"response": "x" * 101}, "longer than 100"),
        ({"steps": ["First, compute", " something else"]}, "bad steps"),
        ({"correct": "yes"}, "correct is not a boolean"),
        ({"messages": "[not json"}, "not valid JSON"),
        ({"messages": "[" * 100_000 + "]" * 100_000}, "not valid JSON"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "not the assistant"),
    ],
)
def test_validation_reasons(change, reason):
    with pytest.raises(RowRejected, match=reason):
        validate_row({**TOTAL_ROW, **change}, max_response_chars=100)


def test_trace_id_is_stable_and_content_addressed():
    a = validate_row(TOTAL_ROW, 10_000)
    b = validate_row({**TOTAL_ROW, "teacher": "t2"}, 10_000)
    assert trace_id(a) == trace_id(validate_row(dict(TOTAL_ROW), 10_000))
    assert trace_id(a) != trace_id(b)
    # the steps are part of it: given ones, or the segmenter settings that will cut them
    stepped = validate_row({**TOTAL_ROW, "steps": [TOTAL_RESPONSE]}, 10_000)
    assert len({trace_id(a), trace_id(a, "line"), trace_id(a, min_step_chars=2)}) == 3
    assert trace_id(stepped) == trace_id(stepped, "line") != trace_id(a)
