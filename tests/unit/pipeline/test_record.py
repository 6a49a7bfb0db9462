"""The job's record of its passes (ln_ray/pipeline/record.py): each pass timed, its declared
outputs checked, the manifest assembled from the records."""

from __future__ import annotations

import pyarrow as pa
import pytest

from ln_ray.config import ComputeConfig
from ln_ray.io.folder import Folder
from ln_ray.pipeline.record import ASSEMBLE, PASSES, SCORE, Timeline, check_written
from ln_ray.schema import REJECTS_SCHEMA, SCORES_SCHEMA


def test_every_pass_is_timed_with_its_resources_and_what_it_reported(tmp_path):
    timeline = Timeline(ComputeConfig(actors=3, gpus_per_actor=1.0), Folder(str(tmp_path)))
    with timeline.run(SCORE) as scored:
        scored.update(rows=5)
    scored.update(traces_scored_now=4)  # known only once a later pass has run
    entry = timeline.stages["tokenize_score"]
    assert entry["rows"] == 5 and entry["traces_scored_now"] == 4 and entry["seconds"] >= 0
    assert entry["resources"]["actors"] == 3 and entry["resources"]["gpus_per_actor"] == 1.0
    assert timeline.seconds("tokenize_score", "reduce") == entry["seconds"]
    # a pass that fails leaves no record
    with pytest.raises(RuntimeError), timeline.run(ASSEMBLE):
        raise RuntimeError("lost a node")
    assert "assemble" not in timeline.stages
    assert [step.name for step in PASSES] == [
        "read_validate",
        "lookup_cache",
        "tokenize_score",
        "compact_cache",
        "assemble",
        "reduce",
    ]


def test_an_output_that_differs_from_its_declaration_fails_its_pass(tmp_path):
    folder = Folder(str(tmp_path))
    folder.write_table("scores/part-0.parquet", SCORES_SCHEMA.empty_table())
    folder.write_table("rejects/part-0.parquet", REJECTS_SCHEMA.empty_table())
    check_written(folder, ASSEMBLE)  # _rows/ not written yet: nothing to check
    wrong = REJECTS_SCHEMA.empty_table().drop_columns(["kind"])
    folder.write_table("rejects/part-0.parquet", wrong)
    with pytest.raises(TypeError, match="assemble wrote rejects/"):
        check_written(folder, ASSEMBLE)
    typed = REJECTS_SCHEMA.empty_table().cast(
        REJECTS_SCHEMA.set(0, pa.field("source_file", pa.large_string()))
    )
    folder.write_table("rejects/part-0.parquet", typed)
    with pytest.raises(TypeError, match="types"):
        check_written(folder, ASSEMBLE)
