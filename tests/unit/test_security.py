"""Security defaults: no remote code, no unpickling or evaluation of input, redacted credentials."""

from __future__ import annotations

import re

import pyarrow as pa

from ln_ray.config import load_config
from ln_ray.io.storage import redacted
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


PRESIGNED = (
    "https://bucket.s3.amazonaws.com/traces/a.jsonl?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAEXAMPLE%2F20261203%2Fus-east-1&X-Amz-Date=20261203T000000Z"
    "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature=f00dfeed"
    "&X-Amz-Security-Token=IQoJsessiontoken"
)
SAS = (
    "https://acct.blob.core.windows.net/c/a.jsonl?sv=2024-11-04&sp=r&se=2026-12-04&sig=c2VjcmV0%3D"
)


def test_query_string_credentials_in_urls_are_redacted():
    from ln_ray.io.storage import redact_url, redact_urls_arrow

    text = f"cannot read {PRESIGNED} or {SAS} or gs://b/x?access_token=ya29.secret;"
    clean = redact_url(text)
    for secret in ("AKIAEXAMPLE", "f00dfeed", "IQoJsessiontoken", "c2VjcmV0", "ya29.secret"):
        assert secret not in clean
    assert "X-Amz-Signature=***" in clean and "&sig=***" in clean and "access_token=***" in clean
    assert "X-Amz-Expires=3600" in clean and "sv=2024-11-04" in clean  # not secrets: kept
    assert redact_url("s3://bucket/part-?.jsonl") == "s3://bucket/part-?.jsonl"  # a glob
    assert redact_urls_arrow(pa.array([text, None])).to_pylist() == [clean, None]
    assert redacted({"input": {"path": PRESIGNED}})["input"]["path"] == redact_url(PRESIGNED)
