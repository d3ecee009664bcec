"""Ctrl-C and SIGTERM stop ``python -m jobs.pipeline`` cleanly, in training and while serving."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from serving import free_port

ROOT = Path(__file__).resolve().parents[2]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _session_processes(sid: int) -> list[str]:
    out = subprocess.run(["ps", "-eo", "sid=,pid=,args="], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if line.split()[0] == str(sid)]


def _tiny_config(folder: Path) -> Path:
    cfg = yaml.safe_load((ROOT / "jobs/configs/synthetic.yaml").read_text())
    cfg["data"]["synthetic"].update(n_users=200, n_items=120, n_interactions=4_000, n_files=1)
    cfg["train"].update(epochs=3)
    cfg["serve"] = {"config": str(ROOT / "serve_configs/local.yaml")}
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    ("phase", "sig", "code"),
    [
        ("serving", signal.SIGINT, 130),
        ("training", signal.SIGINT, 130),
        ("serving", signal.SIGTERM, 143),
        ("training", signal.SIGTERM, 143),
    ],
)
def test_pipeline_stops_on_signal(tmp_path: Path, phase: str, sig: int, code: int) -> None:
    port = free_port()
    log_path = tmp_path / "pipeline.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    marker = "Ctrl-C stops" if phase == "serving" else "Reporting training result 1"
    with open(log_path, "wb") as log:
        # its own process group, so the signal reaches every process a terminal's Ctrl-C would
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobs.pipeline", "--config", str(_tiny_config(tmp_path))]
            + [f"serve.port={port}"],  # the lake stays ./lake, relative to this folder
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 600
        while marker not in log_path.read_text(errors="replace"):
            assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, f"no {marker!r} within 600 s"
            time.sleep(0.5)
        if phase == "serving":
            assert _listening(port)
        before = len(log_path.read_text(errors="replace"))
        sent = time.monotonic()
        os.killpg(proc.pid, sig)
        rc = proc.wait(timeout=30)
        assert time.monotonic() - sent < 30
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = log_path.read_text(errors="replace")
    after = out[before:]
    assert rc == code, f"exit {rc}: {out[-3000:]}"
    assert "Traceback" not in after, after[-3000:]
    # Ray's native failure handler prints this stack dump and aborts when it gets the signal
    assert "SIGTERM received" not in after, after[-3000:]
    assert ("terminated" if sig == signal.SIGTERM else "interrupted") + ": stopping Ray" in after
    # nothing the job started outlives it: no process left in its session, the port closed
    # (after SIGTERM Ray's processes die with the driver, which takes the kernel a moment)
    deadline = time.monotonic() + 15
    while (_session_processes(proc.pid) or _listening(port)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _session_processes(proc.pid)
    assert not _listening(port)
    assert (tmp_path / "lake" / "datasets" / "synthetic").is_dir()
