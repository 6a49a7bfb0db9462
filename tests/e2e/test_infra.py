"""The deployment files are what a cluster accepts, and they agree with each other and the code.

Offline: KubeRay's RayJob CRD (tests/schemas/kuberay), the upstream Kubernetes schemas
(``kubernetes-validate``) and Ray's own cluster launcher schema (inside the ``ray`` package) stand
in for ``kubectl apply --dry-run=server`` and ``ray up``. The nightly refresh's script runs here
against a stand-in ``kubectl``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from ln_ray.config import load_config
from tests.helpers import REPO

INFRA = REPO / "infra"
K8S = INFRA / "k8s"
KUBERNETES = (
    "1.31.0"  # the oldest Kubernetes the manifests are written for (CronJob timeZone: 1.27)
)
DIGEST = re.compile(r"^[\w.\-/]+(:[\w.\-]+)?@sha256:[0-9a-f]{64}$")
TAGGED = re.compile(r"^[\w.\-/]+:[\w.\-]+$")

sys.path.insert(0, str(K8S))
import render_refresh  # noqa: E402


def _docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _rayjob() -> dict:
    (job,) = _docs(K8S / "rayjob.yaml")
    return job


def _refresh() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in _docs(K8S / "refresh-cronjob.yaml")}


def _refresh_rayjob() -> dict:
    return yaml.safe_load(_refresh()["ConfigMap"]["data"]["rayjob.yaml"])


def _pod_specs(job: dict) -> list[dict]:
    cluster = job["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


def _check_entrypoint(entrypoint: str) -> str:
    """python jobs/score.py --config-name NAME key=value...: a real script, a real config."""
    words = shlex.split(entrypoint)
    assert words[:2] == ["python", "jobs/score.py"]
    assert (REPO / words[1]).is_file()
    name = words[words.index("--config-name") + 1]
    overrides = words[words.index("--config-name") + 2 :]
    cfg = load_config(name, overrides)  # the config exists and the overrides are valid keys
    assert cfg.input.path.startswith("s3://") and cfg.output.path.startswith("s3://")
    assert cfg.compute.gpus_per_actor > 0
    return cfg.output.path


def _rayjob_schema() -> dict:
    (crd,) = _docs(REPO / "tests" / "schemas" / "kuberay" / "ray.io_rayjobs.yaml")
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


def _closed(schema: dict) -> dict:
    """The CRD schema with unknown fields refused, as the API server prunes them (a misspelt
    field would be dropped silently there; here it fails)."""
    if isinstance(schema, dict):
        schema = {key: _closed(value) for key, value in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_closed(item) for item in schema]
    return schema


@pytest.mark.parametrize("job", [_rayjob(), _refresh_rayjob()], ids=["rayjob", "refresh"])
def test_rayjobs_are_valid_for_kuberay(job):
    schema = _closed(_rayjob_schema())
    # metadata is the API server's to check (generateName included)
    jsonschema.validate({**job, "metadata": {}}, schema)
    for pod in _pod_specs(job):  # and the pods against the core schema of a Pod's spec
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": pod},
            KUBERNETES,
            strict=True,
        )


def test_a_misspelt_field_fails_the_schema():
    job = _rayjob()
    job["spec"]["shutdownAfterJobFinish"] = True  # no trailing s
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**job, "metadata": {}}, _closed(_rayjob_schema()))


@pytest.mark.parametrize(
    "path", [K8S / "cluster.yaml", K8S / "refresh-cronjob.yaml"], ids=lambda p: p.name
)
def test_core_objects_are_valid_kubernetes(path):
    for doc in _docs(path):
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_aws_launcher_is_valid_for_rays_schema():
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    (cluster,) = _docs(INFRA / "aws" / "cluster.yaml")
    jsonschema.validate(cluster, schema)


def test_the_refresh_is_rendered_from_the_one_rayjob_spec():
    assert (K8S / "refresh-cronjob.yaml").read_text() == render_refresh.render(), (
        "refresh-cronjob.yaml is stale: run python infra/k8s/render_refresh.py"
    )
    one_off, nightly = _rayjob(), _refresh_rayjob()
    assert nightly["spec"] == one_off["spec"]  # same cluster, same output path and cache
    assert nightly["metadata"]["generateName"] == "ln-ray-refresh-"
    assert nightly["metadata"]["labels"]["app.kubernetes.io/component"] == "refresh"
    refresh = _refresh()
    assert refresh["ConfigMap"]["data"]["refresh.sh"] == (K8S / "refresh.sh").read_text()


def test_the_rayjobs_deadline_is_ln_ray_plans_for_the_run_it_is_sized_for():
    """The shipped deadline and retries are what `ln-ray plan` gives for the estimate the spec
    says it is sized for, on the GPUs its worker group has."""
    from ln_ray.plan import rayjob_limits

    sized = re.search(
        r"sized for: ([\d.]+) h of scoring on (\d+) GPUs", (K8S / "rayjob.yaml").read_text()
    )
    assert sized, "rayjob.yaml names the estimate its deadline is sized for"
    hours, gpus = float(sized.group(1)), int(sized.group(2))
    for job in (_rayjob(), _refresh_rayjob()):
        spec = job["spec"]
        limits = rayjob_limits(hours)
        assert spec["activeDeadlineSeconds"] == limits["active_deadline_s"]
        assert spec["backoffLimit"] == limits["backoff_limit"]
        workers = spec["rayClusterSpec"]["workerGroupSpecs"]
        gpus_in_group = sum(
            group["replicas"]
            * int(
                group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
            )
            for group in workers
        )
        assert gpus_in_group == gpus


def test_rayjob_runs_the_job_on_gpu_workers_with_an_idle_head():
    job = _rayjob()
    output = _check_entrypoint(job["spec"]["entrypoint"])
    assert output.endswith("/runs/latest")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 0
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    head, *workers = _pod_specs(job)
    image = head["containers"][0]["image"]
    assert TAGGED.match(image)
    for pod in workers:
        container = pod["containers"][0]
        assert container["image"] == image
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    for pod in (head, *workers):
        mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert mounts["/models"]["readOnly"] is True
        assert volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]["readOnly"] is True
        assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
        for source in pod["containers"][0]["envFrom"]:
            assert source["secretRef"]["optional"] is True  # IRSA needs no secret
    assert "/tmp/ray" in {m["mountPath"] for m in workers[0]["containers"][0]["volumeMounts"]}


def test_everything_a_manifest_names_is_defined():
    """Service accounts, claims and config maps named anywhere are defined in infra/k8s; only
    the storage secret is left to the operator, and every pod treats it as optional."""
    defined: dict[str, set[str]] = {}
    for path in (K8S / "cluster.yaml", K8S / "refresh-cronjob.yaml"):
        for doc in _docs(path):
            defined.setdefault(doc["kind"], set()).add(doc["metadata"]["name"])
    refresh = _refresh()
    cron_pod = refresh["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    pods = [*_pod_specs(_rayjob()), cron_pod]
    for pod in pods:
        assert pod["serviceAccountName"] in defined["ServiceAccount"]
        for volume in pod["volumes"]:
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert claim in defined["PersistentVolumeClaim"]
            if "configMap" in volume:
                assert volume["configMap"]["name"] in defined["ConfigMap"]
    claim = next(d for d in _docs(K8S / "cluster.yaml") if d["kind"] == "PersistentVolumeClaim")
    assert "ReadOnlyMany" in claim["spec"]["accessModes"]


def test_only_the_refresh_may_touch_rayjobs():
    refresh = _refresh()
    pod = refresh["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    binding = refresh["RoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"]}]
    (rule,) = refresh["Role"]["rules"]
    assert rule["resources"] == ["rayjobs"] and set(rule["verbs"]) == {
        "get", "list", "create", "delete"
    }  # fmt: skip
    ray_accounts = {p["serviceAccountName"] for p in _pod_specs(_rayjob())}
    assert pod["serviceAccountName"] not in ray_accounts  # the Ray pods have no RBAC


def test_the_refresh_runs_nightly_in_a_pinned_kubectl_image():
    cron = _refresh()["CronJob"]["spec"]
    assert len(cron["schedule"].split()) == 5 and cron["concurrencyPolicy"] == "Forbid"
    (container,) = cron["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert DIGEST.match(container["image"]), container["image"]
    assert "bitnami" not in container["image"]
    assert container["command"] == ["/bin/sh", "/refresh/refresh.sh"]


FAKE_KUBECTL = """#!/bin/sh
echo "$*" >> "$KUBECTL_LOG"
case "$*" in
  *"component=refresh"*) cat "$KUBECTL_REFRESH_JOBS" ;;
  *"get rayjobs"*) cat "$KUBECTL_ALL_JOBS" ;;
esac
"""


def _run_refresh(tmp_path: Path, all_jobs: str, refresh_jobs: str) -> tuple[str, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(FAKE_KUBECTL)
    kubectl.chmod(kubectl.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "all").write_text(all_jobs)
    (tmp_path / "refresh").write_text(refresh_jobs)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "KUBECTL_LOG": str(tmp_path / "log"),
        "KUBECTL_ALL_JOBS": str(tmp_path / "all"),
        "KUBECTL_REFRESH_JOBS": str(tmp_path / "refresh"),
    }
    done = subprocess.run(
        ["sh", str(K8S / "refresh.sh")], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout, (tmp_path / "log").read_text().splitlines()


def test_the_refresh_refuses_while_a_run_is_unfinished(tmp_path):
    # a one-off run still going (and a new one with no status yet) on the same output path
    out, calls = _run_refresh(tmp_path, "ln-ray-score Running\nln-ray-refresh-a \n", "")
    assert "not started" in out and "ln-ray-score" in out and "ln-ray-refresh-a" in out
    assert not any(c.startswith(("create", "delete")) for c in calls)


def test_the_refresh_keeps_three_finished_runs_and_starts_one(tmp_path):
    finished = "".join(f"ln-ray-refresh-{i} Complete\n" for i in range(5)) + "old Failed\n"
    oldest_first = "".join(f"ln-ray-refresh-{i}\n" for i in range(5))
    out, calls = _run_refresh(tmp_path, finished, oldest_first)
    deletes = [c for c in calls if c.startswith("delete")]
    assert deletes == ["delete rayjob ln-ray-refresh-0", "delete rayjob ln-ray-refresh-1"]
    assert calls[-1] == "create -f /refresh/rayjob.yaml"


def test_dockerfile_pins_cuda_and_torch_together_and_matches_the_project():
    text = (INFRA / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-\$\{CUDA\}$", text, re.M)
    assert re.fullmatch(r"cu1\d\d", args["CUDA"])
    assert 'download.pytorch.org/whl/${CUDA}"' in text and '"torch==${TORCH_VERSION}"' in text
    makefile = (REPO / "Makefile").read_text()
    assert f"TORCH_VERSION ?= {args['TORCH_VERSION']}" in makefile  # tested with that torch
    pyproject = (REPO / "pyproject.toml").read_text()
    low = re.search(r'"torch>=([\d.]+)"', pyproject).group(1)
    assert tuple(map(int, args["TORCH_VERSION"].split("."))) >= tuple(map(int, low.split(".")))
    ray_bounds = re.search(r'"ray\[data\]>=([\d.]+),<([\d.]+)"', pyproject).groups()
    version = tuple(map(int, args["RAY_VERSION"].split(".")))
    assert (
        tuple(map(int, ray_bounds[0].split(".")))
        <= version
        < tuple(map(int, ray_bounds[1].split(".")))
    )
    assert _rayjob()["spec"]["rayClusterSpec"]["rayVersion"] == args["RAY_VERSION"]
    for folder in ("ln_ray", "jobs", "conf"):
        assert f"COPY --chown=ray:users {folder}" in text


def test_aws_launcher_keeps_work_off_the_head_and_fills_models_on_the_host():
    (cluster,) = _docs(INFRA / "aws" / "cluster.yaml")
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    assert any("--num-cpus=0" in c for c in cluster["head_start_ray_commands"])
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu and max(t["max_workers"] for t in gpu) >= 1
    # the model sync runs on the host, into the folder the container mounts at /models
    assert "setup_commands" not in cluster
    assert any("/opt/models" in c for c in cluster["initialization_commands"])
    assert any(o.startswith("-v /opt/models:/models") for o in cluster["docker"]["run_options"])
    assert "iam:PassRole" in (INFRA / "aws" / "cluster.yaml").read_text()


@pytest.mark.parametrize("path", sorted(INFRA.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_manifest_opens_with_how_to_use_it(path):
    assert path.read_text().startswith("#")
