"""The deployment files parse and say what matters: image, entrypoint, GPUs, schedule."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from ln_ray.config import load_config

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
IMAGE = re.compile(r"^[\w.\-/:]+:[\w.\-]+$")


def _docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _check_entrypoint(entrypoint: str) -> None:
    """python jobs/score.py --config-name NAME key=value...: a real script, a real config."""
    words = shlex.split(entrypoint)
    assert words[:2] == ["python", "jobs/score.py"]
    assert (ROOT / words[1]).is_file()
    name = words[words.index("--config-name") + 1]
    overrides = words[words.index("--config-name") + 2 :]
    cfg = load_config(name, overrides)  # the config exists and the overrides are valid keys
    assert cfg.input.path.startswith("s3://") and cfg.output.path.startswith("s3://")
    assert cfg.compute.gpus_per_actor > 0


def _ray_cluster_checks(spec: dict) -> None:
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert IMAGE.match(head["image"])
    workers = spec["workerGroupSpecs"]
    assert workers, "no worker group"
    for group in workers:
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] == head["image"]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def test_dockerfile_builds_on_cuda_ray_base_and_installs_the_project():
    text = (INFRA / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.MULTILINE).group(1)
    assert base.startswith("rayproject/ray:") and "gpu" in base
    assert re.search(r"pip install .*-e \"?\.", text)
    for folder in ("ln_ray", "jobs", "conf"):
        assert f"COPY --chown=ray:users {folder}" in text


def test_rayjob_manifest():
    (job,) = _docs(INFRA / "k8s" / "rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    _check_entrypoint(job["spec"]["entrypoint"])
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    _ray_cluster_checks(job["spec"]["rayClusterSpec"])


def test_refresh_cronjob_submits_the_rayjob_on_a_schedule():
    docs = {doc["kind"]: doc for doc in _docs(INFRA / "k8s" / "refresh-cronjob.yaml")}
    cron = docs["CronJob"]
    schedule = cron["spec"]["schedule"]
    assert len(schedule.split()) == 5
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert command[:3] == ["kubectl", "create", "-f"]
    mounted = pod["volumes"][0]["configMap"]["name"]
    assert mounted == docs["ConfigMap"]["metadata"]["name"]
    (job,) = [yaml.safe_load(text) for text in docs["ConfigMap"]["data"].values()]
    assert job["kind"] == "RayJob"
    _check_entrypoint(job["spec"]["entrypoint"])
    _ray_cluster_checks(job["spec"]["rayClusterSpec"])
    rule = docs["Role"]["rules"][0]
    assert "rayjobs" in rule["resources"] and "create" in rule["verbs"]
    assert docs["RoleBinding"]["subjects"][0]["name"] == pod["serviceAccountName"]


def test_aws_cluster_launcher_has_gpu_workers():
    (cluster,) = _docs(INFRA / "aws" / "cluster.yaml")
    assert cluster["provider"]["type"] == "aws"
    assert IMAGE.match(cluster["docker"]["image"])
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu and max(t["max_workers"] for t in gpu) >= 1
    assert any("ray start --head" in c for c in cluster["head_start_ray_commands"])


@pytest.mark.parametrize("path", sorted(INFRA.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_manifest_opens_with_how_to_use_it(path):
    assert path.read_text().startswith("#")
