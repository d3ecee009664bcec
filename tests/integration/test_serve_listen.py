"""``serve run serve_configs/local.yaml`` starts the fast path and listens on loopback only.

The test runs Serve's own CLI on a copy of local.yaml that differs only in the lake, the model
name and the HTTP port, from the repository root as the README does, and reads the listening
TCP sockets with ``ss -ltnp``. What ScaleRec's config starts must be on 127.0.0.1: the HTTP
frontend (HAProxy), HAProxy's stats and Prometheus listeners, Serve's fallback proxy and the
ingress replicas' own HTTP ports. Ray's own gRPC servers (GCS, raylet, every worker's core
worker port and each replica's inter-deployment gRPC port) bind all interfaces whatever the
config says; docs/design.md lists them.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from serving import free_port

ROOT = Path(__file__).parents[2]
LOOPBACK = {"127.0.0.1", "[::1]", "::1"}
HAPROXY_ADMIN_PORTS = {8404, 9101}
DIRECT_INGRESS_PORTS = range(30000, 31001)  # Serve's default replica HTTP port range
FALLBACK_PROXY_PORT = 8500


def listeners() -> list[tuple[str, int, str]]:
    """(address, port, process names) of every listening TCP socket on the machine."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        addr, _, port = parts[3].rpartition(":")
        procs = ",".join(re.findall(r'\("([^"]+)"', line))
        rows.append((addr, int(port), procs))
    return rows


@pytest.fixture
def local_yaml_run(serve_lake, tmp_path: Path):
    """``serve run`` of local.yaml (own lake, model and port) until the app answers."""
    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2)")
    cfg = yaml.safe_load((ROOT / "serve_configs" / "local.yaml").read_text())
    port = free_port()
    cfg["http_options"]["port"] = port
    cfg["applications"][0]["args"].update(lake=serve_lake.lake.uri, name="tiny-mf")
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    serve_cli = str(Path(sys.executable).with_name("serve"))
    proc = subprocess.Popen(
        [serve_cli, "run", str(path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"serve run did not answer on {url} (exit {proc.poll()})")
            time.sleep(1)
        yield url, port, Path(serve_lake.lake.uri) / "demo_api_key"
    finally:
        proc.send_signal(signal.SIGINT)  # serve run shuts Serve and its local cluster down
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_local_yaml_serves_the_fast_path_on_loopback_only(local_yaml_run) -> None:
    url, port, saved_key = local_yaml_run
    assert requests.get(f"{url}/recommend/u0?k=5", timeout=30).status_code == 401
    key = saved_key.read_text().strip()  # the builder made the lake's demo key
    r = requests.get(f"{url}/recommend/u0?k=5", headers={"X-API-Key": key}, timeout=30)
    assert r.status_code == 200 and len(r.json()["items"]) == 5
    rows = listeners()
    ours = [
        row
        for row in rows
        if "haproxy" in row[2]
        or row[1] in {port, FALLBACK_PROXY_PORT, *HAPROXY_ADMIN_PORTS}
        or row[1] in DIRECT_INGRESS_PORTS
    ]
    # The fast path is on: HAProxy serves the port and forwards to a replica's own HTTP port.
    assert any(p == port and "haproxy" in procs for _, p, procs in ours), rows
    assert any(p in DIRECT_INGRESS_PORTS for _, p, _ in ours), rows
    assert {p for _, p, procs in ours if "haproxy" in procs} >= HAPROXY_ADMIN_PORTS | {port}
    exposed = [row for row in ours if row[0] not in LOOPBACK]
    assert not exposed, f"listening beyond loopback: {exposed}"
    # Whatever else binds all interfaces is Ray's own (its processes are named so).
    ray_names = ("gcs_server", "raylet", "ray::", "python", "serve")
    others = [r for r in rows if r[0] not in LOOPBACK and r not in ours and r[2]]
    assert all(any(n in r[2] for n in ray_names) for r in others), others
