"""Online store of the serving stage: id maps, user histories, live events and the model pointer.

- ``Catalogue``: one dataset version's id maps, known interactions (all splits) and popularity.
- ``Catalogues``: the catalogue of each served model version (``ServedVersion``), loaded once per
  dataset version.
- ``ServingPointer``: the model version the application serves, in
  ``<lake>/serving/<name>/<app name>.json`` (``app.store.pointer_rel``); ``POST /admin/reload``
  rewrites it and every replica follows. It is keyed by the Serve application name, so a
  reload outlives rebuilds of the application and restarts of its replicas.

On a local (or NFS) lake, replicas check the pointer on every request (one ``stat``); on S3
they poll it every ``pointer_poll_s``. Live events are the online store's (``app.events``).
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from app.models import sequence_ranks
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
    """Users x items of every split: each item's rank from the user's latest + 1 as values."""
    popular: np.ndarray
    """Item indices by decreasing interaction count (ties: lower index first)."""
    popularity: np.ndarray
    """Interaction count per item, as float32 scores for popularity answers."""
    genres: list[list[str]]
    events_cursor: dict[str, Any] | None = None
    """Where this version's ingest stopped reading the event log (``data.source: events``):
    the live events before it are in ``history`` already."""

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

    def sequence(self, user_idx: int) -> np.ndarray:
        """A known user's stored items in time order, oldest first."""
        if user_idx < 0 or user_idx >= self.history.shape[0]:
            return np.zeros(0, dtype=np.int64)
        h = self.history
        lo, hi = h.indptr[user_idx], h.indptr[user_idx + 1]
        return np.asarray(h.indices[lo:hi][np.argsort(-h.data[lo:hi], kind="stable")], np.int64)

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
    history = sequence_ranks(ds.read_table("train", "valid", "test"), ds.n_users, ds.n_items)
    counts = np.bincount(history.indices, minlength=ds.n_items).astype(np.float32)
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
        events_cursor=ds.manifest.get("events_cursor"),
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
