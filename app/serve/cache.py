"""Answer cache of the serving stage: LRU with a time-to-live, local to one ingress replica.

Keys hold everything an answer depends on: model version, user, the user's history version, k
and the request's filters, so that a new model, a new event or other filters never hit a stale
entry. Entries also expire after ``ttl_s`` (popularity and catalogue changes between versions).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class TTLCache(Generic[V]):
    """A bounded LRU cache whose entries expire ``ttl_s`` seconds after they were stored."""

    def __init__(
        self, max_size: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_size = int(max_size)
        self.ttl_s = float(ttl_s)
        self._clock = clock
        self._data: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        """False when ``max_size`` is 0 (every lookup misses, nothing is stored)."""
        return self.max_size > 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: Hashable) -> V | None:
        """The fresh value under ``key`` (and mark it recently used), or None."""
        if not self.enabled:
            self.misses += 1
            return None
        entry = self._data.get(key)
        if entry is None or entry[0] < self._clock():
            if entry is not None:
                del self._data[key]
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return entry[1]

    def put(self, key: Hashable, value: V) -> None:
        """Store ``value``; evicts the least recently used entries beyond ``max_size``."""
        if not self.enabled:
            return
        self._data[key] = (self._clock() + self.ttl_s, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_size:
            self._data.popitem(last=False)

    def clear(self) -> None:
        """Drop every entry."""
        self._data.clear()
