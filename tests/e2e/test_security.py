"""Credentials in input URLs (userinfo, a presigned URL's query string) are never stored or
logged by a run of the job."""

from __future__ import annotations

import functools
import json
import logging
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.parquet as pq
import pytest

from ln_ray.config import load_config
from ln_ray.pipeline.job import JobError, run_score


@pytest.fixture
def http_inputs(tmp_path):
    """A folder served over HTTP on loopback (the server ignores the credentials in a URL)."""
    folder = tmp_path / "www"
    folder.mkdir()
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.mark.slow
def test_credentials_in_input_urls_are_never_stored_or_logged(
    ray_cluster, tiny_student_dir, http_inputs, tmp_path, caplog, capfd
):
    folder, host = http_inputs
    row = {"prompt_id": "q1", "prompt": "What is 2+2?", "teacher": "t1",
           "response": "First, add two and two. So the answer is 4."}  # fmt: skip
    rows = [row, row, {**row, "teacher": "t2", "response": ""}]  # a duplicate, an empty response
    (folder / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    secret, signature = "S3CRETTOKEN", "5e1f5ignature"
    query = f"X-Amz-Credential=AKIAKEYID&X-Amz-Signature={signature}&X-Amz-Expires=600"
    out = tmp_path / "out"
    caplog.set_level(logging.INFO)
    cfg = load_config(
        "default",
        [f"input.path=http://alice:{secret}@{host}/a.jsonl?{query}", f"output.path={out}",
         f"student.model={tiny_student_dir}", "selection.bootstrap_samples=10",
         "output.max_reject_fraction=0.5"],
    )  # fmt: skip
    manifest = run_score(cfg)
    with pytest.raises(JobError) as missing:
        url = f"http://alice:{secret}@{host}/b.jsonl?{query}"
        run_score(load_config("default", [f"input.path={url}", f"output.path={out}2"]))

    rejects = pq.read_table(out / manifest.outputs["rejects"]).to_pandas()
    shown = f"http://***@{host}/a.jsonl?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=600"
    assert set(rejects["source_file"]) == {shown}
    assert sorted(rejects["reason"])[0] == f"duplicate of {shown} row 1"
    printed = [json.dumps(manifest.to_json()), str(missing.value), caplog.text, *capfd.readouterr()]
    for path in out.rglob("*"):
        if path.suffix == ".parquet":
            printed.append(str(pq.read_table(path).to_pylist()))
        elif path.is_file():
            printed.append(path.read_text())
    assert len(printed) > 10
    for text in printed:
        for leaked in (secret, "alice", signature, "AKIAKEYID"):
            assert leaked not in text
