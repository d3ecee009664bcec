"""Online store of the serving stage: id maps, user histories, live events and the model pointer.

- ``Catalogue``: one dataset version's id maps, known interactions (all splits) and popularity.
- ``EventLog``: ``POST /events`` appends JSON lines durably under ``<lake>/events/<dataset>/``
  (fsync'ed before the 202) and every ingress replica tails the same log, so the next
  ``/recommend`` on any replica sees them. Each user's *history version* is the number of their
  events in the log, which is part of the answer cache key.
- ``Catalogues``: the catalogue of each served model version (``ServedVersion``), loaded once per
  dataset version.
- ``ServingPointer``: the model version the application serves, in
  ``<lake>/serving/<name>/<app name>.json`` (``app.store.pointer_rel``); ``POST /admin/reload``
  rewrites it and every replica follows. It is keyed by the Serve application name, so a
  reload outlives rebuilds of the application and restarts of its replicas.

On a local (or NFS) lake, replicas check the log and the pointer on every request (one
``scandir``/``stat``, cheap next to a request). On S3 each event batch is its own object and
replicas poll every ``pointer_poll_s``; the replica that accepted the events sees them at once.
"""

from __future__ import annotations

import datetime as dt
import gc
import hashlib
import json
import logging
import os
import posixpath
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from app.store import (
    ITEM_ID,
    ITEM_IDX,
    USER_ID,
    USER_IDX,
    Lake,
    LakeError,
    ModelRecord,
    get_record,
    load_dataset,
    pointer_rel,
)

log = logging.getLogger(__name__)


@dataclass
class Catalogue:
    """Id maps, known interactions and popularity of one dataset version."""

    dataset: str
    version: str
    user_index: dict[str, int]
    item_ids: list[str]
    item_index: dict[str, int]
    history: sp.csr_matrix
    """Binary users x items matrix of every split (items a user already interacted with)."""
    popular: np.ndarray
    """Item indices by decreasing interaction count (ties: lower index first)."""
    popularity: np.ndarray
    """Interaction count per item, as float32 scores for popularity answers."""
    genres: list[list[str]]

    @property
    def n_items(self) -> int:
        """Number of items."""
        return len(self.item_ids)

    def known_items(self, user_idx: int) -> np.ndarray:
        """Item indices of a known user's stored interactions."""
        if user_idx < 0 or user_idx >= self.history.shape[0]:
            return np.zeros(0, dtype=np.int64)
        h = self.history
        return np.asarray(h.indices[h.indptr[user_idx] : h.indptr[user_idx + 1]], dtype=np.int64)

    def unknown_items(self, item_ids: list[str]) -> list[str]:
        """The ids of ``item_ids`` that are not in the catalogue."""
        return [i for i in item_ids if i not in self.item_index]

    def to_index(self, item_ids: list[str]) -> np.ndarray:
        """Internal indices of known item ids (unknown ones are skipped)."""
        idx = [self.item_index[i] for i in item_ids if i in self.item_index]
        return np.asarray(idx, dtype=np.int64)


def load_catalogue(lake: Lake, dataset: str, version: str) -> Catalogue:
    """Read a dataset version's id maps and interactions into memory."""
    ds = load_dataset(lake, dataset, version)
    users = ds.users().column(USER_ID).to_pylist()
    user_idx = ds.users().column(USER_IDX).to_numpy()
    items_t = ds.items()
    item_ids = [""] * ds.n_items
    for idx, iid in zip(
        items_t.column(ITEM_IDX).to_numpy(), items_t.column(ITEM_ID).to_pylist(), strict=True
    ):
        item_ids[int(idx)] = str(iid)
    history = ds.csr("train", "valid", "test").tocsr()
    history.sort_indices()
    counts = np.asarray(history.sum(axis=0), dtype=np.float32).ravel()
    popular = np.lexsort((np.arange(len(counts)), -counts)).astype(np.int64)
    return Catalogue(
        dataset=ds.name,
        version=ds.version,
        user_index={str(u): int(i) for u, i in zip(users, user_idx, strict=True)},
        item_ids=item_ids,
        item_index={iid: i for i, iid in enumerate(item_ids)},
        history=history,
        popular=popular,
        popularity=counts,
        genres=ds.item_genres() or [[] for _ in range(ds.n_items)],
    )


@dataclass
class ServedVersion:
    """One servable model version: its registry record and its dataset's catalogue."""

    version: str
    record: ModelRecord
    catalogue: Catalogue


class Catalogues:
    """Catalogues of the versions a replica serves: the current one and the one it switches to."""

    def __init__(self, lake: Lake, name: str) -> None:
        self.lake = lake
        self.name = name
        self._loaded: dict[tuple[str, str], Catalogue] = {}

    def load(self, version: str, current: ServedVersion | None = None) -> ServedVersion:
        """``version`` of the served model with its catalogue (loaded unless already in memory).

        Loading a new dataset version drops every catalogue except ``current``'s.
        """
        record = get_record(self.lake, self.name, version)
        ds = record.lineage["dataset"]
        key = (str(ds["name"]), str(ds["version"]))
        if key not in self._loaded:
            keep = (
                None if current is None else (current.catalogue.dataset, current.catalogue.version)
            )
            self._loaded = {k: v for k, v in self._loaded.items() if k == keep}
            self._loaded[key] = load_catalogue(self.lake, *key)
            freeze_heap()
        return ServedVersion(record.version, record, self._loaded[key])

    def load_at_start(self, pointed: str | None, configured: str) -> ServedVersion:
        """What a starting replica serves: the serving pointer's version, else the configured one.

        A pointer may name a version deleted since (or one whose files are damaged): the
        replica then starts on the configured version, with one warning, instead of failing
        its start-up on every restart.
        """
        if pointed and pointed != configured:
            try:
                return self.load(pointed)
            except (LakeError, OSError, KeyError, ValueError) as exc:
                log.warning(
                    "serving pointer of %s names %s, which cannot be loaded (%s); "
                    "serving the configured version %s",
                    self.name,
                    pointed,
                    exc,
                    configured,
                )
        return self.load(configured)


def freeze_heap() -> None:
    """Exempt what is loaded now (catalogue dicts, id lists, models) from garbage collection.

    A full collection walks every tracked object, and a loaded catalogue holds hundreds of
    thousands of them: the pause lands on whichever requests are in flight. Frozen objects are
    still freed by reference counting when a reload drops them; only reference cycles among
    them would stay. After a reload that loads a new dataset version only the new objects are
    walked.
    """
    gc.collect()
    gc.freeze()


def event_id(event: dict[str, Any]) -> str:
    """The event's own ``event_id``, else one derived from its content (user, item, type, time).

    A derived id makes a retried batch dedupe; two real actions with the same content and no
    client timestamp count once, so clients that want repeats counted send an id or a time.
    """
    given = event.get("event_id")
    if given:
        return str(given)
    key = [event.get("user_id"), event.get("item_id"), event.get("event"), event.get("timestamp")]
    return "c-" + hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]


class EventLog:
    """Durable append-only log of user events, tailed by every ingress replica.

    Delivery is at least once with dedupe by ``event_id``, so effectively once: a retried batch
    (the client lost the 202) is appended again only where another replica raced it, and every
    reader, on every replica and after every restart, applies an id once.
    """

    def __init__(self, lake: Lake, dataset: str, poll_s: float = 1.0) -> None:
        self.lake = lake
        self.rel = posixpath.join("events", dataset)
        self.poll_s = poll_s
        self._offsets: dict[str, int] = {}
        self._items: dict[str, list[str]] = {}
        self._seen_remote: set[str] = set()
        self._ids: set[str] = set()
        self._last_poll = 0.0
        self._lock = threading.Lock()
        self.n_events = 0

    def version(self, user_id: str) -> int:
        """How many events of ``user_id`` the log holds (0 for none)."""
        return len(self._items.get(user_id, ()))

    def items(self, user_id: str) -> list[str]:
        """External item ids of the user's logged events, oldest first."""
        return self._items.get(user_id, [])

    def append(self, events: list[dict[str, Any]]) -> int:
        """Append the events not logged yet durably (fsync on disk; one PUT on S3), apply them.

        Returns:
            How many were new; the others were in the log already (same ``event_id``).
        """
        # what other replicas logged (poll-gated on S3, so a POST adds no listing of its own)
        self.refresh()
        fresh: dict[str, dict[str, Any]] = {}
        for e in events:
            eid = event_id(e)
            if eid not in self._ids:
                fresh.setdefault(eid, {**e, "event_id": eid})
        if not fresh:
            return 0
        blob = "".join(json.dumps(e, sort_keys=True) + "\n" for e in fresh.values()).encode()
        day = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
        if self.lake.is_local:
            folder = self.lake.path(self.rel)
            os.makedirs(folder, exist_ok=True)
            fd = os.open(
                posixpath.join(folder, f"{day}.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT
            )
            try:
                # One write() with O_APPEND: concurrent replicas never interleave inside a batch.
                os.write(fd, blob)
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            name = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.jsonl"
            self.lake.write_bytes(posixpath.join(self.rel, day, name), blob)
        self.refresh(force=True)
        return len(fresh)

    def refresh(self, force: bool = False) -> None:
        """Apply events other replicas (or this one) appended since the last call."""
        with self._lock:
            if self.lake.is_local:
                self._tail_local()
            elif force or time.monotonic() - self._last_poll >= self.poll_s:
                self._last_poll = time.monotonic()
                self._tail_remote()

    def _apply(self, text: str) -> None:
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                e = json.loads(line)
                user, item = str(e["user_id"]), str(e["item_id"])
            except (ValueError, KeyError, TypeError):
                continue  # a corrupt line never takes serving down
            eid = event_id(e)
            if eid in self._ids:
                continue
            self._ids.add(eid)
            self._items.setdefault(user, []).append(item)
            self.n_events += 1

    def _tail_local(self) -> None:
        try:
            entries = list(os.scandir(self.lake.path(self.rel)))
        except FileNotFoundError:
            return
        for entry in sorted(entries, key=lambda e: e.name):
            if not entry.name.endswith(".jsonl"):
                continue
            size = entry.stat().st_size
            done = self._offsets.get(entry.name, 0)
            if size <= done:
                continue
            with open(entry.path, "rb") as f:
                f.seek(done)
                data = f.read(size - done)
            end = data.rfind(b"\n") + 1  # a line still being written waits for next time
            if end:
                self._apply(data[:end].decode("utf-8", errors="replace"))
                self._offsets[entry.name] = done + end

    def _tail_remote(self) -> None:
        root = self.lake.path(self.rel)
        if not self.lake.fs.exists(root):
            return
        self.lake.fs.invalidate_cache(root)
        for path in sorted(self.lake.fs.find(root)):
            if path.endswith(".jsonl") and path not in self._seen_remote:
                with self.lake.fs.open(path, "rb") as f:
                    self._apply(f.read().decode("utf-8", errors="replace"))
                self._seen_remote.add(path)


class ServingPointer:
    """The served model version of one application (by Serve app name), shared by its replicas."""

    def __init__(self, lake: Lake, name: str, app_name: str, poll_s: float = 1.0) -> None:
        self.lake = lake
        self.rel = pointer_rel(name, app_name)
        self.poll_s = poll_s
        self._stamp: tuple[int, int] | None = None
        self._last_poll = 0.0
        self._value: dict[str, Any] | None = None

    def follow(self, configured: str) -> str | None:
        """The version a starting replica follows: the pointer's, unless the config moved on.

        A reload records the version the config named then (``configured``). When a new
        deployment's config names another version, that deployment is a deliberate change
        and wins: the pointer is reset to it, so replicas do not switch back.
        """
        pointed = self.read()
        recorded = (self._value or {}).get("configured")
        if pointed is None or recorded in (None, configured):
            return pointed
        log.info(
            "the config now names %s (the reload to %s was made under %s): serving the config",
            configured,
            pointed,
            recorded,
        )
        self.write(configured, configured=configured, reason="config changed")
        return configured

    def write(self, version: str, **info: Any) -> None:
        """Point every replica at ``version`` (atomic write)."""
        self.lake.write_json(self.rel, {"version": version, "time": time.time(), **info})
        self._stamp = None

    def read(self, force: bool = False) -> str | None:
        """The version the pointer names, or None before the first reload.

        A remote pointer is fetched at most every ``poll_s`` unless ``force`` (the caller
        paces its polls itself).
        """
        if self.lake.is_local:
            try:
                st = os.stat(self.lake.path(self.rel))
            except FileNotFoundError:
                return None
            stamp = (st.st_mtime_ns, st.st_ino)
            if stamp != self._stamp:
                self._value = self.lake.read_json(self.rel)
                self._stamp = stamp
        elif force or time.monotonic() - self._last_poll >= self.poll_s or self._stamp is None:
            self._last_poll = time.monotonic()
            self._value = self.lake.read_json(self.rel) if self.lake.exists(self.rel) else None
            self._stamp = (0, 0)
        return None if self._value is None else str(self._value["version"])
