"""Helpers shared by the tests that start Serve: a free loopback port, waiting for /healthz."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import requests

LOCAL_YAML = Path(__file__).parents[2] / "serve_configs" / "local.yaml"

NO_AUTH = {"required": False}
"""``ServeAppArgs.auth`` of the apps whose tests are about something else than API keys
(test_serve.py tests keys, scopes and limits on its app)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, timeout: float = 90.0) -> None:
    """Wait (bounded) until ``{url}/healthz`` answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/healthz not ready after {timeout}s")


def start_fast_serve() -> str:
    """``serve.start`` on a free loopback port with serve_configs/local.yaml's fast path
    (HAProxy, direct ingress, its controller environment); returns the base URL."""
    from ray import serve

    from app.serve import load_serve_config

    port = free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": port},
        proxy_location="HeadOnly",
        controller_options=load_serve_config(LOCAL_YAML).controller_options,
    )
    return f"http://127.0.0.1:{port}"


def small_app_args(
    lake_uri: str, name: str, token_env: str, auth: dict[str, Any] | None = None
) -> Any:
    """``ServeAppArgs`` of the app test_serve.py runs and test_serve_fuzz.py fuzzes: small
    limits (k, body, events) so that tests reach them, the cache on, one genre cap."""
    from app.serve import ServeAppArgs

    return ServeAppArgs(
        auth=NO_AUTH if auth is None else auth,
        lake=lake_uri,
        name=name,
        model="production",
        admin_token_env=token_env,
        max_k=20,
        max_per_genre=3,
        max_body_bytes=8 * 1024,
        max_events=50,
        cache_size=1000,
    )
