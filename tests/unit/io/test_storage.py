"""Listing input files and checking where outputs go, on the local filesystem
(ln_ray/io/storage.py)."""

from __future__ import annotations

import logging

import pytest

from ln_ray.io.storage import InputError, check_output_apart, list_input_files


@pytest.fixture
def tree(tmp_path):
    """An input folder with a finished run's outputs written inside it."""
    names = [
        "a.jsonl",
        "sub/b.parquet",
        "notes.csv",
        "sub/c.jsonl.gz",
        "_SUCCESS",
        ".hidden.jsonl",
        "out/manifest.json",
        "out/scores/part-0.parquet",
        "out/_cache/key/part-0.parquet",
        "out/_rows/part-0.parquet",
        "out/_runs/r1/scores/part-0.parquet",
        "_tmp/d.jsonl",
        ".git/e.json",
    ]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}\n")
    return tmp_path


def test_working_folders_below_the_input_are_not_input(tree, caplog):
    with caplog.at_level(logging.WARNING, logger="ln_ray.io.storage"):
        files, skipped = list_input_files(str(tree / "*" / "*"))
    assert [p.removeprefix(f"{tree}/") for p, _ in files] == [
        "out/manifest.json",  # the glob's fixed part is the input folder: out/ is read
        "sub/b.parquet",
    ]
    assert [p.removeprefix(f"{tree}/") for p in skipped] == ["sub/c.jsonl.gz"]
    assert "skipping 1 files" in caplog.text and "c.jsonl.gz" in caplog.text

    files, skipped = list_input_files(str(tree / "out"))
    assert [(p.removeprefix(f"{tree}/"), f) for p, f in files] == [
        ("out/manifest.json", "jsonl"),
        ("out/scores/part-0.parquet", "parquet"),
    ]  # what a run inside the input would read back; check_output_apart refuses that
    assert skipped == []

    files, skipped = list_input_files(str(tree))
    assert [p.removeprefix(f"{tree}/") for p, _ in files] == [
        "a.jsonl",
        "out/manifest.json",
        "out/scores/part-0.parquet",
        "sub/b.parquet",
    ]
    assert [p.removeprefix(f"{tree}/") for p in skipped] == ["notes.csv", "sub/c.jsonl.gz"]
    files, skipped = list_input_files(str(tree), "jsonl")  # a named format reads every suffix
    assert len(files) == 6 and skipped == []


def test_a_file_named_as_the_input_is_read_whatever_its_name(tree):
    files, _ = list_input_files(str(tree / "_tmp" / "d.jsonl"))
    assert files == [(str(tree / "_tmp" / "d.jsonl"), "jsonl")]
    with pytest.raises(InputError, match="no input files"):
        list_input_files(str(tree / "_tmp" / "*.parquet"))


@pytest.mark.parametrize(
    "input_path, output_path",
    [
        ("in", "in/out"),
        ("in/", "in"),
        ("in/*.jsonl", "in/runs/r1"),
        ("in/**/*.parquet", "in/deep/out"),
        ("in", "in/../in/out"),
        ("link", "in/out"),  # the same folder through a symbolic link
    ],
)
def test_an_output_inside_the_input_is_refused(tmp_path, input_path, output_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "in")
    with pytest.raises(InputError, match="is inside input.path"):
        check_output_apart(f"{tmp_path}/{input_path}", f"{tmp_path}/{output_path}")


@pytest.mark.parametrize(
    "input_path, output_path",
    [
        ("in", "out"),
        ("in", "input/out"),
        ("in/a.jsonl", "in/out"),  # a file input: the folder beside it is not read
        ("in/*.jsonl", "out"),
        ("in", "s3://bucket/in/out"),
    ],
)
def test_an_output_beside_the_input_is_fine(tmp_path, input_path, output_path):
    output = output_path if "://" in output_path else f"{tmp_path}/{output_path}"
    check_output_apart(f"{tmp_path}/{input_path}", output)


def test_object_store_paths_compare_by_bucket_and_key():
    with pytest.raises(InputError, match="is inside input.path"):
        check_output_apart("s3://bucket/traces/", "s3://bucket/traces/runs/r1")
    check_output_apart("s3://bucket/traces", "s3://bucket/traces-runs/r1")
    check_output_apart("s3://bucket/traces", "s3://other/traces/out")
