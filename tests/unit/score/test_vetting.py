"""Students refused before any work (ln_ray/score/vetting.py through student.check_student): each
architecture whose packed scores would not be the student's, by name, in one line."""

from __future__ import annotations

import pytest

from bench.tiny import tiny_config
from ln_ray.cli import main
from ln_ray.config import StudentConfig
from ln_ray.score.student import check_student
from ln_ray.score.vetting import COVERED_MODEL_TYPES, StudentError

# Each: config settings beyond the tiny shape, and what the refusal names.
REFUSED = {
    "lfm2": ({"full_attn_idxs": [1]}, r"layers that are not attention \(model type lfm2: conv\)"),
    "qwen3_next": (
        {"layer_types": ["linear_attention", "full_attention"]},
        r"model type qwen3_next: linear_attention",
    ),
    "llama4_text": (
        {"attention_chunk_size": 8, "layer_types": ["chunked_attention", "full_attention"]},
        r"chunked attention \(model type llama4_text, attention_chunk_size=8\)",
    ),
    "gpt_oss": (
        {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8},
        r"attention has sinks \(model\.layers\.0\.self_attn\.sinks, model type gpt_oss\)",
    ),
    "jamba": ({}, r"model type jamba: linear_attention"),
    "falcon_h1": ({}, r"model type falcon_h1: hybrid"),
    "granitemoehybrid": ({}, r"model type granitemoehybrid: linear_attention"),
    "nemotron_h": ({"hybrid_override_pattern": "M*"}, r"model type nemotron_h: linear_attention"),
    "mamba": ({}, r"model type mamba: linear_attention"),
}


def _student(tmp_path, tiny_tokenizer, model_type: str, **settings) -> StudentConfig:
    """A student folder with the config (no weights: vetting reads none) and the tiny tokenizer."""
    folder = tmp_path / model_type
    tiny_config(model_type, len(tiny_tokenizer), **settings).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return StudentConfig(model=str(folder), cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_an_architecture_the_packed_path_does_not_reproduce_is_refused_in_one_line(
    tmp_path, tiny_tokenizer, model_type
):
    settings, named = REFUSED[model_type]
    student = _student(tmp_path, tiny_tokenizer, model_type, **settings)
    with pytest.raises(StudentError, match=named) as refused:
        check_student(student)
    message = str(refused.value)
    assert "\n" not in message and "choose a student of a covered family" in message


def test_the_cli_refuses_such_a_student_with_one_line_and_no_traceback(
    tmp_path, tiny_tokenizer, capsys
):
    student = _student(tmp_path, tiny_tokenizer, "lfm2", full_attn_idxs=[1])
    code = main(["score", f"student.model={student.model}", f"output.path={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("ln-ray: the student has layers that are not attention")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_covered_family_and_an_unlisted_one_are_told_apart(tmp_path, tiny_tokenizer):
    from bench.tiny import make_tiny_causal_lm

    for model_type, covered in (("qwen3", True), ("starcoder2", False)):
        folder = tmp_path / model_type
        make_tiny_causal_lm(model_type, len(tiny_tokenizer)).save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        vetted = check_student(StudentConfig(model=str(folder), cache_dir=str(tmp_path / "c")))
        assert (vetted.model_type, vetted.covered_by_tests) == (model_type, covered)
    assert "starcoder2" not in COVERED_MODEL_TYPES
