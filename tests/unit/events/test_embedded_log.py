"""The embedded event log counts every event once, survives torn lines and short writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.config import EventsArgs
from app.events import event_id
from app.events.embedded import EmbeddedStore, frame, unframe, write_all
from app.store import Lake


def EventLog(lake: Lake, dataset: str, **kw) -> EmbeddedStore:  # noqa: N802 - reads as a type
    return EmbeddedStore(lake, dataset, EventsArgs(**kw))


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
    path = next((tmp_path / "events" / "ds").glob("*/*.log"))
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


def test_a_torn_line_loses_nothing_else(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path))
    one = EventLog(lake, "ds")
    one.append(_events("i1", timestamp=1.0))
    path = next((tmp_path / "events" / "ds").glob("*/*.log"))
    with open(path, "ab") as f:  # the writer died in the middle of a line
        f.write(frame(_events("i2", timestamp=2.0)[0])[:20])
    one._writer = None  # noqa: SLF001 - what a restarted writer process has
    two = EventLog(lake, "ds")
    two.append(_events("i3", timestamp=3.0))
    reader = EventLog(lake, "ds")
    reader.refresh(force=True)
    assert sorted(reader.items("u1")) == ["i1", "i3"]  # files apply in name order


def test_damaged_lines_are_skipped_and_counted() -> None:
    line = frame({"user_id": "u", "item_id": "i"})
    assert unframe(line.rstrip(b"\n")) == {"user_id": "u", "item_id": "i"}
    flipped = line.replace(b'"i"', b'"j"')
    assert unframe(flipped.rstrip(b"\n")) is None


def test_history_is_capped_but_the_version_counts_on(tmp_path: Path) -> None:
    log = EventLog(Lake(str(tmp_path)), "ds", history_cap=2)
    log.append(_events("i1", "i2", "i3", timestamp=1.0))
    assert log.items("u1") == ["i2", "i3"] and log.version("u1") == 3


def test_short_writes_continue_and_a_zero_write_fails(tmp_path: Path, monkeypatch) -> None:
    real = os.write
    calls = []

    def short(fd, data):
        calls.append(len(data))
        return real(fd, bytes(data[:3]))

    monkeypatch.setattr(os, "write", short)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    write_all(fd, b"0123456789")
    os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"0123456789" and len(calls) == 4
    monkeypatch.setattr(os, "write", lambda fd, data: 0)
    fd = os.open(tmp_path / "g", os.O_WRONLY | os.O_CREAT)
    with pytest.raises(OSError, match="not durable"):
        write_all(fd, b"x")
    os.close(fd)


def test_a_failed_write_is_not_acknowledged_and_rotates_the_file(
    tmp_path: Path, monkeypatch
) -> None:
    lake = Lake(str(tmp_path))
    log = EventLog(lake, "ds")
    log.append(_events("i1", timestamp=1.0))
    first = log._writer  # noqa: SLF001
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space")))
    with pytest.raises(OSError):
        log.append(_events("i2", timestamp=2.0))
    monkeypatch.undo()
    assert log.version("u1") == 1  # nothing applied that was not made durable
    log.append(_events("i3", timestamp=3.0))
    assert log._writer != first  # noqa: SLF001


def test_start_after_a_cursor_replays_only_later_events(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path))
    log = EventLog(lake, "ds")
    log.append(_events("i1", "i2", timestamp=1.0))
    events, cursor = log.read_since(None)
    assert [e["item_id"] for e in events] == ["i1", "i2"]
    log.append(_events("i3", timestamp=2.0))
    later = EmbeddedStore(lake, "ds", EventsArgs(), start=cursor)
    later.refresh(force=True)
    assert later.items("u1") == ["i3"]
    assert [e["item_id"] for e in log.read_since(cursor)[0]] == ["i3"]
