"""Real Ray nodes for tests: ``ray start --block`` processes on loopback, with token auth on.

Each node is its own process group (``start_new_session``), so a test can SIGKILL a whole node
(raylet, its workers and agents) the way a machine loss would, and teardown kills every process
a node started without touching any other Ray instance on the host (``ray stop`` would).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from serving import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def cluster_env(token_path: Path) -> dict[str, str]:
    """The environment of the nodes and of every client: the venv first, token auth on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        RAY_DATA_DISABLE_PROGRESS_BARS="1",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
    )
    return env


@dataclass
class Node:
    """One ``ray start --block`` process group."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def kill(self) -> None:
        """SIGKILL every process of the node at once (a lost machine)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM the node (``ray start --block`` then stops its processes), else SIGKILL."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        self.kill()  # whatever outlived the SIGTERM in the group


@dataclass
class LocalCluster:
    """A head (and optional workers) on 127.0.0.1; ``address`` for ``ray job submit``."""

    root: Path
    env: dict[str, str]
    gcs: str
    dashboard: str
    nodes: list[Node] = field(default_factory=list)

    def _start(self, name: str, args: list[str]) -> Node:
        log = self.root / f"{name}.log"
        ports = [
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
        ]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *ports, *args],
                cwd=ROOT,  # the head's jobs and Serve resolve repo-relative paths from here
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        node = Node(name, proc, log)
        self.nodes.append(node)
        return node

    def add_worker(
        self, name: str, num_cpus: int, resources: dict[str, float] | None = None
    ) -> Node:
        """Join a worker node with its own CPUs and custom resources (to force placement)."""
        # Node ids, not a count: a node killed just before may still count as alive.
        before = self.alive_ids()
        node = self._start(
            name,
            [
                f"--address={self.gcs}",
                "--node-ip-address=127.0.0.1",
                f"--num-cpus={num_cpus}",
                f"--resources={json.dumps(resources or {})}",
                "--object-store-memory=300000000",
            ],
        )
        deadline = time.monotonic() + 120
        while not self.alive_ids() - before:
            if node.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {name} did not join:\n{node.log.read_text()[-3000:]}")
            time.sleep(1)
        return node

    def alive_nodes(self) -> int:
        """How many nodes the cluster counts alive."""
        return len(self.alive_ids())

    def alive_ids(self) -> set[str]:
        """The ids of the nodes the cluster counts alive."""
        return {str(n["node_id"]) for n in self.state("nodes") if n.get("state") == "ALIVE"}

    def state(self, *args: str) -> list[dict]:
        """``ray list <args> --format json`` through the dashboard (token included)."""
        out = subprocess.run(
            [str(BIN / "ray"), "list", *args, "--address", self.dashboard, "--format", "json"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        try:
            return list(json.loads(out.stdout)) if out.returncode == 0 else []
        except json.JSONDecodeError:  # "No resource in the cluster" while it starts
            return []

    def node_id(self, resource: str) -> str:
        """The id of the alive node that holds custom ``resource``."""
        for n in self.state("nodes", "--detail"):
            if n.get("state") == "ALIVE" and resource in n.get("resources_total", {}):
                return str(n["node_id"])
        raise LookupError(f"no alive node holds {resource}")

    def stop(self) -> None:
        """Stop every node, workers first."""
        for node in reversed(self.nodes):
            node.stop()


@contextmanager
def local_cluster(
    head_cpus: int = 2, head_resources: dict | None = None, env: dict[str, str] | None = None
) -> Iterator[LocalCluster]:
    """A head node on loopback with its dashboard on 127.0.0.1 and a fresh auth token.

    ``env`` is added to every node's environment (S3 endpoint and credentials, say).
    """
    root = Path(tempfile.mkdtemp(prefix="sr-cluster-", dir="/tmp"))
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    gcs_port, dash_port = free_port(), free_port()
    cluster = LocalCluster(
        root=root,
        env={**cluster_env(token), **(env or {})},
        gcs=f"127.0.0.1:{gcs_port}",
        dashboard=f"http://127.0.0.1:{dash_port}",
    )
    head = cluster._start(
        "head",
        [
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}",
            f"--ray-client-server-port={free_port()}",
            f"--num-cpus={head_cpus}",
            f"--resources={json.dumps(head_resources or {})}",
            "--object-store-memory=400000000",
            f"--temp-dir={root / 'ray'}",
        ],
    )
    try:
        deadline = time.monotonic() + 180
        while cluster.alive_nodes() < 1:
            if head.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not start:\n{head.log.read_text()[-3000:]}")
            time.sleep(1)
        yield cluster
    finally:
        cluster.stop()
