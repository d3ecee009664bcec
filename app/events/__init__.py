"""The online store of live events: one interface (``OnlineStore``), two backends.

- ``embedded`` (default, no extra server): ``app.events.embedded``, a CRC-framed log in the lake.
- ``redis``: ``app.events.redis_store``, per-user lists, an id set with TTL and a stream.

``open_store`` picks one from the ``events`` settings.
"""

from __future__ import annotations

from app.config import EventsArgs
from app.events.base import EVENT_FIELDS, Cursor, OnlineStore, UserHistories, event_id
from app.store import Lake

__all__ = [
    "EVENT_FIELDS",
    "Cursor",
    "OnlineStore",
    "UserHistories",
    "event_id",
    "open_store",
]


def open_store(
    lake: Lake, dataset: str, args: EventsArgs, start: Cursor | None = None
) -> OnlineStore:
    """The online store of ``dataset``'s live events.

    Args:
        lake: The lake (the embedded backend's home).
        dataset: Dataset name.
        args: The ``events`` settings (``backend`` picks the store).
        start: Cursor to start after (embedded: the served dataset version's ``events_cursor``;
            Redis keeps its per-user state server-side and ignores it).
    """
    if args.backend == "redis":
        from app.events.redis_store import RedisStore

        return RedisStore(dataset, args)
    from app.events.embedded import EmbeddedStore

    return EmbeddedStore(lake, dataset, args, start)
