"""Model versions of a running application: a reload outlives a rebuild, and registry deletion
refuses the version a live app serves (real local Ray cluster, real HTTP on its own port).

The lake-only parts (pointers, heartbeats, deletion) are tested in tests/unit/store/test_usage.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from serving import NO_AUTH, free_port, wait_healthy

from app.serve import ServeAppArgs, build_application
from app.store import Lake, VersionInUse, delete_version, list_versions, users

APP_NAME = "scalerec-versions"
TOKEN_ENV = "SCALEREC_TEST_ADMIN_TOKEN"
TOKEN = "s3cret-test-token"
TIMEOUT = 30
SMALL = {"ray_actor_options": {"num_cpus": 0.25}}


def _args(lake: Lake, name: str, **overrides: Any) -> ServeAppArgs:
    # One deployment (the ingress scores itself): the fewest actors that still serve the app.
    return ServeAppArgs(
        auth=NO_AUTH,
        lake=lake.uri,
        name=name,
        model="production",
        admin_token_env=TOKEN_ENV,
        colocate_scoring=True,
        **overrides,
    )


def _deploy(lake: Lake, name: str, **overrides: Any) -> None:
    """Build a fresh application and (re)deploy it under ``APP_NAME`` (waits until RUNNING)."""
    from ray import serve

    app = build_application(_args(lake, name, **overrides), {"Ingress": SMALL})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)


def _health(url: str) -> dict[str, Any]:
    r = requests.get(f"{url}/healthz", timeout=TIMEOUT)
    r.raise_for_status()
    body: dict[str, Any] = r.json()
    return body


def _replicas(lake: Lake, name: str) -> set[str]:
    """Replica ids with a heartbeat of ``APP_NAME`` in the lake."""
    folder = f"serving/{name}/live/{APP_NAME}"
    return {f.removesuffix(".json") for f in lake.listdir(folder) if f.endswith(".json")}


@pytest.fixture(scope="module")
def served(ray_cluster: None, serve_lake) -> Iterator[str]:
    from ray import serve

    os.environ[TOKEN_ENV] = TOKEN
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    url = f"http://127.0.0.1:{port}"
    try:
        _deploy(serve_lake.lake, serve_lake.name)
        wait_healthy(url)
        yield url
    finally:
        serve.delete(APP_NAME)
        serve.shutdown()


def test_reload_survives_rebuild(served: str, serve_lake) -> None:
    lake, name, versions = serve_lake.lake, serve_lake.name, serve_lake.versions
    assert _health(served)["model_version"] == versions[0]  # production, as configured
    before = _replicas(lake, name)
    assert before, "the running replica wrote no heartbeat"

    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = requests.post(
        f"{served}/admin/reload", json={"model": "staging"}, headers=auth, timeout=TIMEOUT
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"previous": versions[0], "version": versions[1]}
    assert _health(served)["model_version"] == versions[1]

    # Rebuild under the same name with other init args: Serve replaces the replica, and the
    # new one is configured with ``production`` again; the pointer must win.
    _deploy(lake, name, cache_size=17)
    wait_healthy(served)
    deadline = time.monotonic() + 60
    while not (_replicas(lake, name) - before) or (before & _replicas(lake, name)):
        assert time.monotonic() < deadline, (
            f"replica not replaced, or the old heartbeat not removed: "
            f"before {before}, now {_replicas(lake, name)}"
        )
        time.sleep(0.5)
    for _ in range(5):
        assert _health(served)["model_version"] == versions[1]
    answer = requests.get(f"{served}/recommend/u0", params={"k": 5}, timeout=TIMEOUT).json()
    assert answer["model_version"] == versions[1]


def test_delete_refuses_the_live_version(served: str, serve_lake) -> None:
    lake, name = serve_lake.lake, serve_lake.name
    version = _health(served)["model_version"]
    live = [u for u in users(lake, name, version) if u.startswith(f"live app {APP_NAME} (")]
    assert live, users(lake, name, version)
    with pytest.raises(VersionInUse) as info:
        delete_version(lake, name, version)
    assert f"live app {APP_NAME} (replica " in str(info.value)
    assert version in list_versions(lake, name)
    # the heartbeat is what names the app: with it ignored, only the alias and pointer remain
    others = users(lake, name, version, live_s=0)
    assert not [u for u in others if u.startswith("live app")]
    assert _health(served)["model_version"] == version  # still served
