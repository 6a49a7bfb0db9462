"""Waiting for the cluster a run was configured for, against a cluster that grows on cue."""

from __future__ import annotations

import logging

import pytest
import ray
import ray.autoscaler.sdk

from ln_ray.config import ComputeConfig
from ln_ray.pipeline.ray_ops import ClusterTooSmall, wait_for_cluster


@pytest.fixture
def cluster(monkeypatch):
    """A cluster whose ``cluster_resources`` answers come from ``sizes`` (the last one stays),
    and the autoscaler requests made to it."""

    class Cluster:
        def __init__(self) -> None:
            self.sizes: list[dict[str, float]] = []
            self.requests: list[tuple[int | None, list | None]] = []

        def resources(self) -> dict[str, float]:
            return self.sizes.pop(0) if len(self.sizes) > 1 else self.sizes[0]

    fake = Cluster()
    monkeypatch.setattr(ray, "cluster_resources", fake.resources)
    monkeypatch.setattr(
        ray.autoscaler.sdk,
        "request_resources",
        lambda num_cpus=None, bundles=None: fake.requests.append((num_cpus, bundles)),
    )
    return fake


def test_it_waits_for_workers_that_join_and_asks_the_autoscaler_meanwhile(cluster, caplog):
    cluster.sizes = [{"CPU": 0.0}, {"CPU": 0.0}, {"CPU": 8.0}, {"CPU": 16.0, "GPU": 2.0}]
    with caplog.at_level(logging.INFO, logger="ln_ray"):
        wait_for_cluster(ComputeConfig(min_cpus=16, min_gpus=1.5), poll_s=0)
    assert cluster.sizes == [{"CPU": 16.0, "GPU": 2.0}]  # it asked until the cluster was there
    assert cluster.requests == [(16, [{"GPU": 1}, {"GPU": 1}]), (0, None)]  # then withdrew
    assert "waiting for the cluster: it has 0 of 16 CPUs, 0 of 1.5 GPUs" in caplog.text


def test_a_cluster_already_as_large_is_not_waited_for(cluster):
    cluster.sizes = [{"CPU": 4.0}]
    wait_for_cluster(ComputeConfig(min_cpus=4), poll_s=0)
    wait_for_cluster(ComputeConfig(), poll_s=0)
    assert cluster.requests == []


def test_a_cluster_that_stays_too_small_fails_in_time_and_withdraws_its_request(cluster):
    cluster.sizes = [{"CPU": 2.0, "GPU": 0.0}]
    with pytest.raises(ClusterTooSmall, match=r"has 0 of 8 GPUs after 0s"):
        wait_for_cluster(ComputeConfig(min_cpus=2, min_gpus=8, wait_for_cluster_s=0.05), 0.01)
    assert cluster.requests == [(2, [{"GPU": 1}] * 8), (0, None)]


def test_ray_datas_own_progress_is_off_unless_asked_for(caplog):
    import warnings

    from ray.data import DataContext

    from ln_ray.pipeline.ray_ops import quiet_ray_data

    context = DataContext.get_current()
    try:
        quiet_ray_data(False)
        assert not context.enable_progress_bars and not context.print_on_execution_start
        assert logging.getLogger("ray.data").getEffectiveLevel() == logging.WARNING
        from ray.util.annotations import RayDeprecationWarning

        deprecated = "`ray_remote_args` is deprecated and will be removed in Ray 2.64."
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("default")
            warnings.warn(deprecated, RayDeprecationWarning, stacklevel=1)  # as Ray Data warns
            quiet_ray_data(False)  # its filter goes first in line
            warnings.warn(deprecated, RayDeprecationWarning, stacklevel=1)
        assert [str(w.message) for w in seen] == [deprecated]  # the first one only
        with caplog.at_level(logging.WARNING, logger="ray.data.dataset"):
            logging.getLogger("ray.data.dataset").warning(
                "Warning: The Ray cluster currently does not have any available CPUs."
            )
        assert "available CPUs" not in caplog.text
        quiet_ray_data(True)
        assert context.enable_progress_bars and context.print_on_execution_start
        assert logging.getLogger("ray.data").getEffectiveLevel() == logging.INFO
    finally:
        quiet_ray_data(False)
