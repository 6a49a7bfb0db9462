"""A Ray cluster of several nodes on this machine, for the tests that need a real one.

Every node is ``ray start --block`` on 127.0.0.1 with ports of its own (another Ray on this
machine, the tests' own, holds the defaults); the test stops only the nodes it started.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path

RAY = Path(sys.executable).with_name("ray")
_CURRENT = Path("/tmp/ray/ray_current_cluster")  # where `ray start` records its cluster


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalRay:
    """Ray nodes on 127.0.0.1, started by the test and stopped by it alone.

    Args:
        env: The nodes' environment (default: this process's, without ``RAY_*`` settings,
            with a token of the cluster's own, as README's setup has it). A driver joins with
            it and ``RAY_ADDRESS`` set to ``address``.
    """

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = env or {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        if env is None:
            self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
        self.env["PATH"] = f"{RAY.parent}{os.pathsep}{self.env['PATH']}"  # as in a virtualenv
        self.address = ""  # the GCS's, once the head runs
        self.nodes: list[subprocess.Popen] = []
        self._before = _CURRENT.read_text() if _CURRENT.exists() else None

    def start_head(self, num_cpus: int, *options: str) -> str:
        """Start the head node; its GCS address (``127.0.0.1:port``)."""
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self._start("--head", f"--port={port}", f"--num-cpus={num_cpus}",
                    f"--ray-client-server-port={free_port()}", *options)  # fmt: skip
        return self.address

    @property
    def driver_env(self) -> dict[str, str]:
        """The environment of a driver that joins the cluster (as ``ray job submit`` sets it)."""
        return {**self.env, "RAY_ADDRESS": self.address}

    def add_node(self, num_cpus: int) -> subprocess.Popen:
        """Start a worker node that joins the head."""
        return self._start(f"--address={self.address}", f"--num-cpus={num_cpus}")

    def kill(self, node: subprocess.Popen) -> None:
        """SIGKILL a node's raylet and workers at once, as a preempted spot node dies."""
        os.killpg(node.pid, signal.SIGKILL)
        node.wait()

    def stop(self) -> None:
        for node in reversed(self.nodes):
            if node.poll() is not None:
                continue
            os.killpg(node.pid, signal.SIGTERM)  # --block: each node stops what it started
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
        if self._before is None:
            _CURRENT.unlink(missing_ok=True)
        else:
            _CURRENT.write_text(self._before)

    def _start(self, *options: str) -> subprocess.Popen:
        ports = [
            f"--{name}={free_port()}"
            for name in (
                "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port",
                "metrics-export-port",
                "runtime-env-agent-port",
            )
        ]
        node = subprocess.Popen(
            [str(RAY), "start", "--block", "--node-ip-address=127.0.0.1",
             "--disable-usage-stats", *ports, *options],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        self.nodes.append(node)
        return node
