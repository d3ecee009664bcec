"""The event log counts every event once: retries, other replicas and restarts included."""

from __future__ import annotations

from pathlib import Path

from app.serve.store import EventLog, event_id
from app.store import Lake


def _events(*items: str, user: str = "u1", **extra) -> list[dict]:
    return [{"user_id": user, "item_id": i, "event": "click", **extra} for i in items]


def test_a_retried_batch_counts_once(tmp_path: Path) -> None:
    log = EventLog(Lake(str(tmp_path)), "ds")
    batch = _events("i1", "i2", timestamp=1_700_000_000.0)
    assert log.append(batch) == 2
    # the client lost the 202 and sends the same batch again
    assert log.append(batch) == 0
    assert log.version("u1") == 2 and log.items("u1") == ["i1", "i2"]


def test_client_ids_decide_what_is_a_repeat(tmp_path: Path) -> None:
    log = EventLog(Lake(str(tmp_path)), "ds")
    assert log.append(_events("i1", event_id="a")) == 1
    assert log.append(_events("i1", event_id="b")) == 1  # a real second click on the same item
    assert log.append(_events("i1", event_id="a")) == 0
    assert log.version("u1") == 2


def test_other_replicas_and_restarts_apply_an_id_once(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path))
    one, two = EventLog(lake, "ds"), EventLog(lake, "ds")
    batch = _events("i1", "i2", "i3", timestamp=1.0)
    assert one.append(batch) == 3
    # the retry reaches another replica, which has not tailed the log yet
    assert two.append(batch) == 0
    # even when both wrote it (a race), readers apply each id once
    path = next((tmp_path / "events" / "ds").glob("*.jsonl"))
    path.write_bytes(path.read_bytes() * 2)
    restarted = EventLog(lake, "ds")
    restarted.refresh()
    one.refresh()
    assert restarted.version("u1") == one.version("u1") == 3
    assert restarted.n_events == 3


def test_derived_ids_depend_on_content_only() -> None:
    a = {"user_id": "u1", "item_id": "i1", "event": "click", "timestamp": 5.0}
    assert event_id(a) == event_id(dict(a)) != event_id({**a, "timestamp": 6.0})
    assert event_id({**a, "event_id": "x"}) == "x"
    # no client time: the id must not depend on the arrival time the server fills in later
    assert event_id({**a, "timestamp": None}) == event_id({**a, "timestamp": None})
