"""The embedded online store: an append-only, CRC-framed event log in the lake.

Layout: ``<lake>/events/<dataset>/<YYYY-MM-DD>/<writer>.log``. Each writer (an ingress replica
process) appends to its own file, so replicas never interleave and a line torn by a crash
(or a short write on a full disk) ends that writer's file: the writer rotates to a new file
after any failed write, and readers take only whole lines whose CRC-32 matches. A line is
``<crc32 of the JSON, 8 hex digits> <JSON>`` and a newline.

Durability: a batch is one ``write`` loop (it fails on a short write) + ``fsync`` of the file,
and of the folders when the file or its day folder is new, before ``append`` returns. On S3 each
batch is one object (one PUT; S3 is durable on success).

Readers (every replica) mirror the log into ``UserHistories``: a fixed-size state per user.
A replica starts from the cursor of the dataset version it serves (``events_cursor`` in the
manifest, set when events were ingested into it), so start-up replays only the events the
dataset does not already contain. On a local lake a refresh lists only the newest day
folders (a few ``stat`` calls per request; a full listing every ``FULL_SCAN_S``); on S3 the
ingress polls from a worker thread every ``pointer_poll_s``.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
import zlib
from typing import Any

from app.config import EventsArgs
from app.events.base import Cursor, OnlineStore, UserHistories, event_id
from app.store import Lake

log = logging.getLogger(__name__)

FULL_SCAN_S = 10.0
"""Local lakes: how often a refresh lists every day folder, not only the newest two."""


def frame(event: dict[str, Any]) -> bytes:
    """One log line: CRC-32 of the JSON, a space, the JSON, a newline."""
    body = json.dumps(event, sort_keys=True, separators=(",", ":")).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def unframe(line: bytes) -> dict[str, Any] | None:
    """The event of a log line, or None when the line is damaged (bad CRC, not JSON)."""
    crc, _, body = line.partition(b" ")
    try:
        if len(crc) != 8 or int(crc, 16) != zlib.crc32(body):
            return None
        event = json.loads(body)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def _legacy(line: bytes) -> dict[str, Any] | None:
    # logs written before CRC framing: plain JSON lines (``<day>.jsonl``)
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` (a short write continues; a zero-byte write fails)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, "write wrote nothing; the event log is not durable")
        view = view[n:]


class EmbeddedStore(OnlineStore):
    """The append-only log in the lake, mirrored by every replica (see the module docstring).

    Args:
        lake: The lake holding ``events/``.
        dataset: Dataset name.
        args: The ``events`` settings.
        start: Cursor to start after (the served dataset version's ``events_cursor``).
    """

    def __init__(
        self, lake: Lake, dataset: str, args: EventsArgs, start: Cursor | None = None
    ) -> None:
        super().__init__(dataset, args)
        self.lake = lake
        self.rel = posixpath.join("events", dataset)
        self.histories = UserHistories(args.history_cap, args.dedupe_window)
        self._offsets: dict[str, int] = dict((start or {}).get("files", {}))
        self._writer: str | None = None
        self._lock = threading.Lock()
        self._last_full = 0.0
        self.corrupt = 0
        """Damaged lines skipped (a torn line is not counted until a later line follows it)."""

    # -- reads ----------------------------------------------------------------------------

    def version(self, user_id: str) -> int:
        """How many events of ``user_id`` were applied."""
        return self.histories.version(user_id)

    def items(self, user_id: str) -> list[str]:
        """The user's most recent event items, oldest first."""
        return self.histories.items(user_id)

    @property
    def n_events(self) -> int:
        """Events applied by this replica."""
        return self.histories.n_events

    def refresh(self, force: bool = False) -> None:
        """Apply the lines appended since the last call (by any writer)."""
        with self._lock:
            full = force or time.monotonic() - self._last_full >= FULL_SCAN_S
            if full:
                self._last_full = time.monotonic()
            for _, data in self._new_data(self._offsets, full):
                for event in data:
                    self._apply(event)

    def _apply(self, e: dict[str, Any]) -> None:
        try:
            user, item = str(e["user_id"]), str(e["item_id"])
        except (KeyError, TypeError):
            self.corrupt += 1
            return
        self.histories.apply(user, item, event_id(e))

    def _files(self, full: bool) -> list[str]:
        """Log files (relative to the dataset folder) in name order; newest two days unless full."""
        days = [d for d in self.lake.listdir(self.rel) if not d.endswith(".jsonl")]
        legacy = [d for d in self.lake.listdir(self.rel) if d.endswith(".jsonl")] if full else []
        out = list(legacy)
        for day in days if full else days[-2:]:
            out.extend(
                posixpath.join(day, n)
                for n in self.lake.listdir(posixpath.join(self.rel, day))
                if n.endswith((".log", ".jsonl"))
            )
        return out

    def _new_data(self, offsets: dict[str, int], full: bool) -> list[tuple[str, list[dict]]]:
        """Whole new lines of every file past ``offsets`` (advanced in place), parsed."""
        found = []
        for rel in self._files(full):
            path = self.lake.path(self.rel, rel)
            done = offsets.get(rel, 0)
            if self.lake.is_local:
                try:
                    size = os.stat(path).st_size
                except FileNotFoundError:
                    continue
                if size <= done:
                    continue
                with open(path, "rb") as f:
                    f.seek(done)
                    data = f.read(size - done)
            elif done:
                continue  # an S3 object is written whole, once
            else:
                with self.lake.fs.open(path, "rb") as f:
                    data = f.read()
            end = data.rfind(b"\n") + 1  # a line still being written waits for next time
            if not end:
                continue
            parse = _legacy if rel.endswith(".jsonl") else unframe
            events = []
            for line in data[:end].splitlines():
                if not line.strip():
                    continue
                event = parse(line)
                if event is None:
                    self.corrupt += 1
                else:
                    events.append(event)
            offsets[rel] = done + end
            found.append((rel, events))
        return found

    def read_since(self, cursor: Cursor | None) -> tuple[list[dict[str, Any]], Cursor]:
        """Every logged event after ``cursor``, each id once, and the cursor at the end."""
        offsets = dict((cursor or {}).get("files", {}))
        seen: set[str] = set()
        out = []
        with self._lock:
            if not self.lake.is_local:
                self.lake.fs.invalidate_cache(self.lake.path(self.rel))
            for _, events in self._new_data(offsets, full=True):
                for e in events:
                    eid = event_id(e)
                    if eid not in seen:
                        seen.add(eid)
                        out.append({**e, "event_id": eid})
        return out, {"backend": "embedded", "files": offsets}

    # -- writes ---------------------------------------------------------------------------

    def append(self, events: list[dict[str, Any]]) -> int:
        """Log the events this replica has not seen yet durably, then apply them."""
        self.refresh()  # what other replicas logged: their events dedupe a retry here too
        fresh: dict[str, dict[str, Any]] = {}
        for e in events:
            eid = event_id(e)
            if not self.histories.seen(str(e["user_id"]), eid):
                fresh.setdefault(eid, {**e, "event_id": eid})
        if not fresh:
            return 0
        blob = b"".join(frame(e) for e in fresh.values())
        day = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
        if self.lake.is_local:
            self._append_local(day, blob)
        else:
            name = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.log"
            self.lake.write_bytes(posixpath.join(self.rel, day, name), blob)
        with self._lock:
            applied = sum(
                self.histories.apply(str(e["user_id"]), str(e["item_id"]), eid)
                for eid, e in fresh.items()
            )
        # the bytes just written are applied; the tail skips them
        self.refresh()
        return applied

    def _append_local(self, day: str, blob: bytes) -> None:
        root = self.lake.path(self.rel)
        folder = posixpath.join(root, day)
        if not os.path.isdir(folder):
            os.makedirs(folder, exist_ok=True)
            _fsync_dir(root)
            _fsync_dir(posixpath.dirname(root))
        if self._writer is None or not self._writer.startswith(day):
            host = socket.gethostname().split(".")[0]
            self._writer = f"{day}/{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}.log"
        path = posixpath.join(root, self._writer)
        new = not os.path.exists(path)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            write_all(fd, blob)
            os.fsync(fd)
        except OSError:
            # a torn tail ends this file: the next batch starts a new one, whole
            self._writer = None
            raise
        finally:
            os.close(fd)
        if new:
            _fsync_dir(folder)
