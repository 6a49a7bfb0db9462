"""Security defaults: no remote code, no unpickling or evaluation of input, redacted credentials."""

from __future__ import annotations

import re

from ln_ray.config import load_config
from ln_ray.pipeline.outputs import redacted
from tests.helpers import REPO

PACKAGE = REPO / "ln_ray"


def test_remote_code_and_downloads_are_off_by_default():
    for name in ("default", "cluster"):
        cfg = load_config(name)
        assert cfg.student.trust_remote_code is False
        assert cfg.student.allow_download is False


def test_input_is_never_unpickled_or_evaluated():
    # Builtin eval/exec, not methods such as ``model.eval()``; torch.load and read_pickle unpickle.
    forbidden = re.compile(
        r"\b(pickle|marshal|dill)\.loads?\(|(?<![\w.])(eval|exec)\s*\(|yaml\.load\("
        r"|torch\.load\(|read_pickle\("
    )
    assert forbidden.search("x = eval(text)") and not forbidden.search("model.eval()")
    for path in PACKAGE.rglob("*.py"):
        assert not forbidden.search(path.read_text()), path


def test_credentials_in_urls_are_redacted():
    config = {"input": {"path": "s3://AKIAXXXX:sup3rsecret@bucket/traces"}, "n": 3}
    clean = redacted(config)
    assert "sup3rsecret" not in str(clean) and "AKIAXXXX" not in str(clean)
    assert clean["input"]["path"] == "s3://***@bucket/traces" and clean["n"] == 3
