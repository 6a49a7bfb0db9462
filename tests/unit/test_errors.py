"""Errors a person can fix say how, in one line naming the key, file or row (ln-ray's CLI)."""

from __future__ import annotations

import pytest

from ln_ray.cli import main
from ln_ray.pipeline.accounting import RejectBudgetError, check_reject_budget


def _fails(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("ln-ray: ") and err.count("\n") <= 2 and "Traceback" not in err
    return err


def test_a_config_file_that_is_not_yaml_is_named_with_its_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("input:\n  path: [oops\n")
    err = _fails(capsys, "config", "--config-name", str(bad))
    assert f"config file '{bad}' is not valid YAML, line 3, column 1: " in err


def test_a_student_path_that_does_not_exist_says_what_student_model_may_be(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"prompt": "Q", "response": "A", "teacher": "t"}\n')
    err = _fails(
        capsys,
        "inspect",
        str(tmp_path / "in.jsonl"),
        f"student.model={tmp_path / 'no-such-student'}",
    )
    assert "no such folder; set student.model to a local model folder, a .gguf file" in err


def test_an_input_path_that_does_not_exist_says_what_to_set(tmp_path, capsys):
    err = _fails(capsys, "inspect", str(tmp_path / "nowhere"))
    assert "does not exist: set input.path to the traces' file, folder or glob" in err


def test_a_run_over_its_reject_budget_names_the_most_common_reasons():
    reasons = {"missing teacher": 11, "invalid JSON": 1, "duplicate": 40, "empty response": 2}
    with pytest.raises(RejectBudgetError) as failed:
        check_reject_budget(14, {"input": 14}, 0.05, reasons)
    assert str(failed.value) == (
        "14 of 14 rows were rejected (100.0%, by kind: input 14; most common: "
        "'missing teacher' 11, 'empty response' 2, 'invalid JSON' 1), more than "
        "output.max_reject_fraction=0.05 allows"
    )
