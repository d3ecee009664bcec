"""No acknowledged event is lost or counted twice when the process holding it is killed.

A real local Ray cluster serves the app with each online-store backend; after a 202 the
ingress replica is killed with SIGKILL (for Redis, the Redis server too, restarted on its AOF).
After recovery every acknowledged event is in the log once, the user's history version counts
it once, and the recommendations exclude the items the events named.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from redis_server import redis_server
from serving import NO_AUTH, free_port, wait_healthy

from app.config import EventsArgs
from app.events import open_store
from app.serve import ServeAppArgs, build_application

APP = "scalerec-events-kill"
TIMEOUT = 30
pytestmark = pytest.mark.slow


@pytest.fixture(params=["embedded", "redis"])
def events_args(request: pytest.FixtureRequest, tmp_path) -> Iterator[tuple[EventsArgs, Any]]:
    if request.param == "embedded":
        yield EventsArgs(), None
        return
    with redis_server(tmp_path / "redis") as server:
        yield EventsArgs(backend="redis", redis_url=server.url), server


def _replica_pid() -> int:
    from ray.util.state import list_actors

    alive = [
        a
        for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True)
        if a.class_name == f"ServeReplica:{APP}:Ingress"
    ]
    assert len(alive) == 1, alive
    return int(alive[0].pid)


def _post(url: str, events: list[dict[str, Any]]) -> requests.Response:
    return requests.post(f"{url}/events", json={"events": events}, timeout=TIMEOUT)


def _until_recovered(url: str, old_pid: int | None) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if old_pid is None or _replica_pid() != old_pid:
                wait_healthy(url, timeout=60)
                return
        except AssertionError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the ingress replica did not come back within 120 s")


def test_events_survive_sigkill_after_202(ray_cluster: None, serve_lake, events_args) -> None:
    from ray import serve

    args, server = events_args
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    url = f"http://127.0.0.1:{port}"
    app_args = ServeAppArgs(
        auth=NO_AUTH,
        lake=serve_lake.lake.uri,
        name="tiny-mf",
        model="production",
        colocate_scoring=True,
        events=args,
        cache_size=100,
    )
    app = build_application(app_args, {"Ingress": {"ray_actor_options": {"num_cpus": 0.25}}})
    serve.run(app, name=APP, route_prefix="/", blocking=False)
    try:
        wait_healthy(url)
        acked: dict[str, list[str]] = {}
        for round_ in range(2):
            batch = [
                {
                    "user_id": f"u{u}",
                    "item_id": f"i{(u * 7 + round_) % 40}",
                    "event_id": f"k{round_}-{u}",
                }
                for u in range(5)
            ]
            r = _post(url, batch)
            assert r.status_code == 202, r.text
            for e in batch:
                acked.setdefault(e["user_id"], []).append(e["item_id"])
            pid = _replica_pid()
            os.kill(pid, signal.SIGKILL)  # right after the 202
            if server is not None and round_ == 1:
                server.kill_and_restart()
            _until_recovered(url, pid)
            # the client retries the batch whose answer it may have lost: counted once
            assert _post(url, batch).json()["duplicates"] == len(batch)

        logged, _ = open_store(serve_lake.lake, "tiny", args).read_since(None)
        ids = [e["event_id"] for e in logged if e["event_id"].startswith("k")]
        assert sorted(ids) == sorted(f"k{r}-{u}" for r in range(2) for u in range(5))
        for user, items in acked.items():
            answer = requests.get(f"{url}/recommend/{user}", timeout=TIMEOUT).json()
            assert answer["history_version"] == len(items), (user, answer)
            assert not set(items) & {x["item_id"] for x in answer["items"]}
    finally:
        serve.delete(APP)
        serve.shutdown()
