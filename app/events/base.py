"""The online store's one interface, and the bounded per-user state both backends share.

An ``OnlineStore`` holds the live events of one dataset: ``append`` makes a batch durable
before ``POST /events`` answers 202, ``version``/``items`` give a user's history version
(part of the answer cache key) and recent items, and ``read_since`` hands the whole log
after a cursor to ingestion (``data.source: events``), which records the cursor it reached in
the new dataset version, so that replicas serving that version start after it.

Delivery is at least once with dedupe by ``event_id``, so effectively once: a retried batch
(the client lost the 202) is applied once by every reader, on every replica and after every
restart, as long as the retry comes within the dedupe window (``EventsArgs``).
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from typing import Any

from app.config import EventsArgs

Cursor = dict[str, Any]
"""Where a reader of the log stands; backend-specific, JSON-able, stored in dataset manifests."""

EVENT_FIELDS = ("event_id", "user_id", "item_id", "event", "timestamp", "received_at")
"""The fields of a logged event (``append`` takes dicts with these keys)."""


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


class _User:
    # Plain lists, not deques and sets: a deque allocates a 64-slot block and a set a table
    # even for a user with one event, and most users have few.
    __slots__ = ("count", "items", "ids")

    def __init__(self) -> None:
        self.count = 0
        self.items: list[str] = []
        self.ids: list[str] = []


class UserHistories:
    """Per-user live state with a fixed size per user, whatever the traffic.

    For each user: how many events were applied (the history version), the last
    ``history_cap`` items, and the last ``dedupe_window`` event ids (for idempotency).
    """

    def __init__(self, history_cap: int, dedupe_window: int) -> None:
        self.cap = history_cap
        self.window = dedupe_window
        self._users: dict[str, _User] = {}
        self.n_events = 0

    def seen(self, user_id: str, eid: str) -> bool:
        """Whether the user's recent events include ``eid``."""
        u = self._users.get(user_id)
        return u is not None and eid in u.ids

    def apply(self, user_id: str, item_id: str, eid: str) -> bool:
        """Apply one event unless its id is in the user's window; True when applied."""
        u = self._users.get(user_id)
        if u is None:
            u = self._users[user_id] = _User()
        elif eid in u.ids:
            return False
        u.ids.append(eid)
        if len(u.ids) > self.window:
            del u.ids[0]
        u.items.append(item_id)
        if len(u.items) > self.cap:
            del u.items[0]
        u.count += 1
        self.n_events += 1
        return True

    def version(self, user_id: str) -> int:
        """How many events of the user were applied (0 for none)."""
        u = self._users.get(user_id)
        return 0 if u is None else u.count

    def items(self, user_id: str) -> list[str]:
        """The user's last ``history_cap`` items, oldest first."""
        u = self._users.get(user_id)
        return [] if u is None else list(u.items)

    @property
    def n_users(self) -> int:
        """Users with at least one event."""
        return len(self._users)


class OnlineStore(ABC):
    """Live events of one dataset: durable appends, per-user reads, the log for ingestion.

    Args:
        dataset: Dataset name (each dataset has its own log).
        args: The ``events`` settings.
    """

    def __init__(self, dataset: str, args: EventsArgs) -> None:
        self.dataset = dataset
        self.args = args

    @abstractmethod
    def append(self, events: list[dict[str, Any]]) -> int:
        """Make the events not logged yet durable, then apply them; returns how many were new.

        Each dict has the ``EVENT_FIELDS``. When this returns, every new event survives a
        crash of this process (and, for Redis with AOF, of the server).

        Raises:
            OSError: When the events could not be made durable (nothing may be acknowledged).
        """

    @abstractmethod
    def version(self, user_id: str) -> int:
        """The user's history version: how many of their events the store applied."""

    @abstractmethod
    def items(self, user_id: str) -> list[str]:
        """External item ids of the user's latest events (at most ``history_cap``), oldest first."""

    def refresh(self, force: bool = False) -> None:  # noqa: B027 - optional for a backend
        """Apply what other writers appended since the last call (backends that mirror)."""

    @abstractmethod
    def read_since(self, cursor: Cursor | None) -> tuple[list[dict[str, Any]], Cursor]:
        """Every logged event after ``cursor`` (None: from the start), each once, and the end.

        Returns:
            The events (dicts with ``EVENT_FIELDS``) in log order, and the cursor after the last.
        """

    def close(self) -> None:  # noqa: B027 - optional for a backend
        """Release connections and files."""
