"""One contract for every online store backend (embedded log in the lake, Redis with AOF).

``store_factory`` opens a store on the backend's shared state (one lake, or one Redis
server flushed per test); each call is another replica or a restarted process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis_server import RedisServer, redis_server

from app.config import EventsArgs
from app.events import OnlineStore, open_store
from app.store import Lake

StoreFactory = Callable[..., OnlineStore]


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


def _flush(url: str) -> None:
    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        client.flushall()
    finally:
        client.close()


@pytest.fixture(params=["embedded", "redis"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens stores of dataset ``ds`` on one backend; ``make(**events_overrides)``."""
    opened: list[OnlineStore] = []
    lake = Lake(str(tmp_path / "lake"))
    base: dict[str, Any] = {}
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("shared_redis")
        _flush(server.url)
        base = {"backend": "redis", "redis_url": server.url}

    def make(**overrides: Any) -> OnlineStore:
        store = open_store(lake, "ds", EventsArgs(**base, **overrides))
        opened.append(store)
        return store

    try:
        yield make
    finally:
        for store in opened:
            store.close()


def _events(user: str, items: list[str], prefix: str = "e") -> list[dict[str, Any]]:
    return [
        {"event_id": f"{prefix}-{user}-{n}", "user_id": user, "item_id": item, "event": "click"}
        for n, item in enumerate(items)
    ]


def test_online_store_append_returns_new_count(store_factory: StoreFactory) -> None:
    store = store_factory()
    assert store.append([]) == 0
    assert store.append(_events("u1", ["a", "b"]) + _events("u2", ["c"])) == 3
    assert store.version("u1") == 2 and store.items("u1") == ["a", "b"]
    assert store.version("u2") == 1 and store.items("u2") == ["c"]
    assert store.version("nobody") == 0 and store.items("nobody") == []


def test_online_store_retried_batch_counts_once(store_factory: StoreFactory) -> None:
    store = store_factory()
    batch = _events("u1", ["a", "b"])
    assert store.append(batch) == 2
    assert store.append(batch) == 0  # the client lost the 202 and sent it again
    assert store.append(batch + _events("u1", ["c"], prefix="f")) == 1
    assert store.version("u1") == 3 and store.items("u1") == ["a", "b", "c"]
    # within one batch, a repeated event counts once too
    assert store.append(_events("u2", ["x"]) * 2) == 1
    assert store.version("u2") == 1


def test_online_store_replica_sees_other_writes(store_factory: StoreFactory) -> None:
    first, second = store_factory(), store_factory()
    assert first.append(_events("u1", ["a", "b"])) == 2
    second.refresh(force=True)
    assert second.version("u1") == 2 and second.items("u1") == ["a", "b"]
    # a retry landing on the other replica dedupes as well
    assert second.append(_events("u1", ["a", "b"])) == 0
    assert second.append(_events("u1", ["c"], prefix="f")) == 1
    first.refresh(force=True)
    assert first.version("u1") == 3 and first.items("u1") == ["a", "b", "c"]


def test_online_store_restart_keeps_events_once(store_factory: StoreFactory) -> None:
    store = store_factory()
    assert store.append(_events("u1", ["a", "b"]) + _events("u2", ["c"])) == 3
    store.close()
    restarted = store_factory()
    restarted.refresh(force=True)
    assert restarted.version("u1") == 2 and restarted.items("u1") == ["a", "b"]
    assert restarted.version("u2") == 1
    assert restarted.append(_events("u1", ["a", "b"])) == 0
    events, _ = restarted.read_since(None)
    assert len(events) == 3


def test_online_store_history_capped_version_counts(store_factory: StoreFactory) -> None:
    store = store_factory(history_cap=3)
    items = [f"i{n}" for n in range(7)]
    assert store.append(_events("u1", items[:4])) == 4
    assert store.append(_events("u1", items[4:], prefix="f")) == 3
    assert store.version("u1") == 7
    assert store.items("u1") == ["i4", "i5", "i6"]
    other = store_factory(history_cap=3)
    other.refresh(force=True)
    assert other.version("u1") == 7 and other.items("u1") == ["i4", "i5", "i6"]
    # the log keeps everything for ingestion
    assert [e["item_id"] for e in store.read_since(None)[0]] == items


def test_events_read_since_each_once_in_order(store_factory: StoreFactory) -> None:
    store = store_factory()
    first = _events("u1", ["a", "b"]) + _events("u2", ["c"])
    store.append(first)
    store.append(first)  # a retry adds nothing to the log
    events, cursor = store.read_since(None)
    assert [e["event_id"] for e in events] == [e["event_id"] for e in first]
    assert [(e["user_id"], e["item_id"]) for e in events] == [("u1", "a"), ("u1", "b"), ("u2", "c")]
    assert store.read_since(cursor) == ([], cursor)  # nothing new: the same cursor back
    later = _events("u3", ["d", "e"])
    store.append(later)
    since, end = store.read_since(cursor)
    assert [e["event_id"] for e in since] == [e["event_id"] for e in later]
    assert store.read_since(end)[0] == []
    # another replica reads the same log from the same cursor
    assert [e["event_id"] for e in store_factory().read_since(cursor)[0]] == ["e-u3-0", "e-u3-1"]


def test_events_ids_distinct_across_users(store_factory: StoreFactory) -> None:
    store = store_factory()
    # no client ids: the derived id includes the user, so equal actions of two users differ
    same = {"item_id": "a", "event": "view", "timestamp": 1_700_000_000.0}
    assert store.append([{**same, "user_id": "u1"}, {**same, "user_id": "u2"}]) == 2
    assert store.append([{**same, "user_id": "u1"}]) == 0
    events, _ = store.read_since(None)
    ids = [e["event_id"] for e in events]
    assert len(ids) == 2 and len(set(ids)) == 2
    assert store.version("u1") == 1 and store.version("u2") == 1


def test_redis_durable_after_sigkill(tmp_path: Path) -> None:
    with redis_server(tmp_path / "redis") as server:
        args = EventsArgs(backend="redis", redis_url=server.url)
        store = open_store(Lake(str(tmp_path / "lake")), "ds", args)
        try:
            batch = _events("u1", ["a", "b", "c"]) + _events("u2", ["d"])
            assert store.append(batch) == 4
            server.kill_and_restart()  # right after the append returned
            # the same client reconnects; a fresh one (a restarted replica) sees the same
            fresh = open_store(Lake(str(tmp_path / "lake")), "ds", args)
            try:
                for s in (store, fresh):
                    assert s.version("u1") == 3 and s.items("u1") == ["a", "b", "c"]
                    assert s.version("u2") == 1
                    ids = [e["event_id"] for e in s.read_since(None)[0]]
                    assert ids == [e["event_id"] for e in batch]
                assert fresh.append(batch) == 0  # dedupe state survived too
            finally:
                fresh.close()
        finally:
            store.close()


def test_redis_online_store_down_raises_oserror(tmp_path: Path) -> None:
    with redis_server(tmp_path / "redis") as server:
        server.kill()
        url = server.url.replace("redis://", "redis://:s3cret@")
        # a replica may start while Redis is down; its appends then fail, unacknowledged
        store = open_store(
            Lake(str(tmp_path / "lake")), "ds", EventsArgs(backend="redis", redis_url=url)
        )
        try:
            with pytest.raises(OSError) as raised:
                store.append(_events("u1", ["a"]))
            assert "127.0.0.1" in str(raised.value) and "s3cret" not in str(raised.value)
            with pytest.raises(OSError):
                store.version("u1")
        finally:
            store.close()
