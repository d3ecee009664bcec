"""The Redis online store (``events.backend: redis``): serving writes it, ingestion reads it.

Keys of a dataset start with ``scalerec:{<dataset>}:``; the braces are a Redis Cluster hash
tag, so one dataset's keys share a slot and the multi-key append script can run there too.

- ``seen:<event_id>``: set for ``dedupe_ttl_s`` once an event was applied (idempotency).
- ``log``: a stream of every applied event (``e``: its JSON), read by ``read_since``.
- ``hist:<user>``: the user's last ``history_cap`` items; ``ver:<user>``: their event count.

A batch is applied by one Lua script, atomically, so a crash never leaves an event logged
but not counted (or the reverse). Durability comes from the server: with ``appendonly yes``
and ``appendfsync always`` Redis fsyncs the AOF before it replies, so a returned ``append``
survives a SIGKILL of Redis. The store warns once when the server is configured otherwise.
"""

from __future__ import annotations

import json
import logging
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import redis

from app.config import EventsArgs
from app.events.base import EVENT_FIELDS, Cursor, OnlineStore, event_id

log = logging.getLogger(__name__)

PAGE = 10_000
"""Stream entries fetched per ``XRANGE`` round trip in ``read_since``."""

# KEYS: log, then (seen, hist, ver) per event; ARGV: ttl ms, cap, then (json, item) per event.
_APPEND_LUA = """
local ttl, cap, new = ARGV[1], tonumber(ARGV[2]), 0
for i = 0, (#KEYS - 1) / 3 - 1 do
  local hist = KEYS[3 + 3 * i]
  if redis.call('SET', KEYS[2 + 3 * i], '1', 'NX', 'PX', ttl) then
    redis.call('XADD', KEYS[1], '*', 'e', ARGV[3 + 2 * i])
    redis.call('RPUSH', hist, ARGV[4 + 2 * i])
    redis.call('LTRIM', hist, -cap, -1)
    redis.call('INCR', KEYS[4 + 3 * i])
    new = new + 1
  end
end
return new
"""


class RedisUnavailable(OSError):
    """Redis did not answer or refused a command; nothing of the call may be acknowledged."""


def redacted(url: str) -> str:
    """``url`` without its password (safe for logs and error messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:***@" if parts.username else "***@"
    host = parts.hostname or ""
    netloc = user + (f"[{host}]" if ":" in host else host)
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


class RedisStore(OnlineStore):
    """Live events of one dataset in a Redis server (see the module docstring).

    Args:
        dataset: Dataset name (its keys' prefix).
        args: The ``events`` settings (``redis_url``, ``history_cap``, ``dedupe_ttl_s``).
    """

    def __init__(self, dataset: str, args: EventsArgs) -> None:
        super().__init__(dataset, args)
        self.url = redacted(args.redis_url)
        self.prefix = f"scalerec:{{{dataset}}}:"
        self.client = redis.Redis.from_url(
            args.redis_url,
            socket_timeout=2,
            socket_connect_timeout=2,
            health_check_interval=30,
            decode_responses=True,
        )
        self._append = self.client.register_script(_APPEND_LUA)
        self._checked = False
        self._check_durability()

    def _error(self, what: str, exc: redis.RedisError) -> RedisUnavailable:
        return RedisUnavailable(f"Redis at {self.url} failed to {what}: {exc}")

    def _check_durability(self) -> None:
        """Warn once when the server would acknowledge writes it has not fsynced."""
        try:
            conf = self.client.config_get("append*")
        except (redis.ConnectionError, redis.TimeoutError):
            return  # unreachable now: checked again on the next append
        except redis.RedisError:
            self._checked = True  # CONFIG disabled or renamed (managed Redis): trust the operator
            return
        self._checked = True
        if conf.get("appendonly") != "yes" or conf.get("appendfsync") != "always":
            log.warning(
                "Redis at %s has appendonly=%s appendfsync=%s: acknowledged events can be lost "
                "in a crash; run it with appendonly yes and appendfsync always",
                self.url,
                conf.get("appendonly"),
                conf.get("appendfsync"),
            )

    def append(self, events: list[dict[str, Any]]) -> int:
        """Apply the events not seen within ``dedupe_ttl_s``; returns how many were new."""
        if not events:
            return 0
        if not self._checked:
            self._check_durability()
        ttl_ms = max(1, int(self.args.dedupe_ttl_s * 1000))
        keys: list[str] = [self.prefix + "log"]
        argv: list[str | int] = [ttl_ms, self.args.history_cap]
        for e in events:
            eid = event_id(e)
            user, item = str(e["user_id"]), str(e["item_id"])
            body = {k: e.get(k) for k in EVENT_FIELDS} | {"event_id": eid}
            keys += [f"{self.prefix}seen:{eid}", f"{self.prefix}hist:{user}"]
            keys.append(f"{self.prefix}ver:{user}")
            argv += [json.dumps(body, sort_keys=True, separators=(",", ":")), item]
        try:
            # a retry inside redis-py after a lost reply is safe: SET NX skips applied events
            return int(self._append(keys=keys, args=argv))
        except redis.RedisError as exc:
            raise self._error("append events", exc) from exc

    def version(self, user_id: str) -> int:
        """How many events of ``user_id`` were applied (0 for none)."""
        try:
            value = self.client.get(f"{self.prefix}ver:{user_id}")
        except redis.RedisError as exc:
            raise self._error("read a history version", exc) from exc
        return int(value) if value is not None else 0

    def items(self, user_id: str) -> list[str]:
        """The user's last ``history_cap`` items, oldest first."""
        try:
            items = self.client.lrange(f"{self.prefix}hist:{user_id}", 0, -1)
        except redis.RedisError as exc:
            raise self._error("read a history", exc) from exc
        return cast("list[str]", items)  # decode_responses: str, not bytes

    def read_since(self, cursor: Cursor | None) -> tuple[list[dict[str, Any]], Cursor]:
        """Every logged event after ``cursor`` (None: from the start) in log order, and the end.

        A cursor of another backend says nothing about this log, so it reads from the start.
        """
        last = None
        if cursor is not None:
            if cursor.get("backend") == "redis":
                last = str(cursor["stream_id"])
            else:
                log.warning("cursor %s is not a Redis one: reading the whole log", cursor)
        start = "-" if last is None else f"({last}"
        out: list[dict[str, Any]] = []
        try:
            while True:
                page = cast(
                    "list[tuple[str, dict[str, str]]]",
                    self.client.xrange(self.prefix + "log", start, "+", count=PAGE),
                )
                for entry_id, fields in page:
                    out.append(json.loads(fields["e"]))
                    last = entry_id
                if len(page) < PAGE:
                    break
                start = f"({last}"
        except redis.RedisError as exc:
            raise self._error("read the event log", exc) from exc
        return out, {"backend": "redis", "stream_id": last if last is not None else "0-0"}

    def close(self) -> None:
        """Close the connection pool."""
        self.client.close()
