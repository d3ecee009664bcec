"""A real ``redis-server`` on 127.0.0.1 for tests, with an AOF fsynced on every write.

``redis_server(dir)`` starts one and stops it on exit; ``RedisServer.kill_and_restart()``
SIGKILLs it and starts it again on the same folder and port, as a crash and a restart would.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from serving import free_port

READY_S = 10.0
"""Longest wait for a started server to answer PING (it replays its AOF first)."""


def _binary() -> str:
    path = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if path is None:
        pytest.skip("redis-server not found: apt-get install redis-server")
    return path


def _spawn(folder: Path, port: int) -> subprocess.Popen[bytes]:
    """Start redis-server on ``port`` with its data in ``folder``; wait until it answers PING."""
    folder.mkdir(parents=True, exist_ok=True)
    logfile = folder / "redis.log"
    cmd = [
        _binary(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(folder),
        "--appendonly", "yes",
        "--appendfsync", "always",
        "--save", "",
        "--protected-mode", "yes",
        "--logfile", str(logfile),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1)
    deadline = time.monotonic() + READY_S
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if client.ping():
                    return proc
            except redis.RedisError:
                pass  # not listening yet, or LOADING the AOF
            time.sleep(0.05)
    finally:
        client.close()
    _stop(proc)
    tail = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else ""
    raise RuntimeError(f"redis-server on port {port} not ready in {READY_S}s:\n{tail}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def start_redis(folder: Path, port: int | None = None) -> tuple[str, subprocess.Popen[bytes]]:
    """Start a server with its data in ``folder`` (on a free port unless given); (url, process).

    The caller stops the process (``terminate``, or ``kill`` to simulate a crash).
    """
    if port is not None:
        return f"redis://127.0.0.1:{port}/0", _spawn(Path(folder), port)
    for attempt in range(3):
        port = free_port()
        try:
            return f"redis://127.0.0.1:{port}/0", _spawn(Path(folder), port)
        except RuntimeError:
            if attempt == 2:
                raise  # another process took the free port each time
    raise AssertionError("unreachable")


@dataclass
class RedisServer:
    """A running test server: its URL, data folder and process."""

    url: str
    folder: Path
    process: subprocess.Popen[bytes]

    @property
    def port(self) -> int:
        """The server's TCP port."""
        return int(self.url.rsplit(":", 1)[1].split("/")[0])

    def kill(self) -> None:
        """SIGKILL the server (no shutdown, no final AOF rewrite), as a crash would."""
        self.process.kill()
        self.process.wait(timeout=5)

    def restart(self) -> None:
        """Start it again on the same folder and port; returns once it has replayed its AOF."""
        self.process = _spawn(self.folder, self.port)

    def kill_and_restart(self) -> None:
        """SIGKILL the server, then start it on the same folder and port."""
        self.kill()
        self.restart()

    def stop(self) -> None:
        """Terminate the server (kill after 5 s)."""
        _stop(self.process)


@contextmanager
def redis_server(folder: Path) -> Iterator[RedisServer]:
    """A server with its data in ``folder`` for the ``with`` block; stopped however it ends."""
    url, proc = start_redis(Path(folder))
    server = RedisServer(url, Path(folder), proc)
    try:
        yield server
    finally:
        server.stop()
