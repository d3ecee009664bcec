"""Prometheus metrics of the serving stage (``ray.serve.metrics``), created inside replicas.

Exported on each node's Ray metrics export port as ``ray_scalerec_*`` next to Serve's built-in
``ray_serve_*`` series (the scrape config: docs/design.md, "Metrics").
"""

from __future__ import annotations

import asyncio
import collections

from ray.serve.metrics import Counter, Gauge, Histogram

LATENCY_BOUNDARIES_MS = [1, 2, 3, 5, 7.5, 10, 15, 20, 25, 35, 50, 75, 100, 250, 500, 1000]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64]
FLUSH_S = 1.0
"""Counts are added up in the replica and pushed to Ray at most this often: each push of a
Ray metric costs event-loop time, too much to pay per request per counter."""


class LocalCounts:
    """Increments per (counter, tags) added up in the process until ``drain``."""

    def __init__(self) -> None:
        self._n: collections.Counter[tuple[str, tuple[tuple[str, str], ...]]] = (
            collections.Counter()
        )

    def add(self, counter: str, n: int = 1, **tags: str) -> None:
        """Count ``n`` for ``counter`` with ``tags``."""
        self._n[(counter, tuple(sorted(tags.items())))] += n

    def drain(self) -> list[tuple[str, dict[str, str], int]]:
        """Everything counted since the last drain, as ``(counter, tags, n)``; then reset."""
        out = [(name, dict(tags), n) for (name, tags), n in self._n.items() if n]
        self._n.clear()
        return out

    def __len__(self) -> int:
        return len(self._n)


class ServeMetrics:
    """The custom metrics of one replica; ``component`` tags them (ingress, retriever)."""

    def __init__(self, component: str) -> None:
        tags = {"component": component}
        self.latency_ms = Histogram(
            "scalerec_request_latency_ms",
            description="Ingress latency per endpoint, from request to answer (ms).",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("component", "endpoint"),
        )
        self.latency_ms.set_default_tags(dict(tags))
        self.requests = Counter(
            "scalerec_requests",
            description="Requests by endpoint and HTTP status.",
            tag_keys=("component", "endpoint", "status"),
        )
        self.requests.set_default_tags(dict(tags))
        self.cache = Counter(
            "scalerec_cache_lookups",
            description="Answer cache lookups by result (hit / miss).",
            tag_keys=("component", "result"),
        )
        self.cache.set_default_tags(dict(tags))
        self.batch_size = Histogram(
            "scalerec_batch_size",
            description="Queries scored per batch.",
            boundaries=BATCH_BOUNDARIES,
            tag_keys=("component",),
        )
        self.batch_size.set_default_tags(dict(tags))
        self.model_version = Gauge(
            "scalerec_model_version_info",
            description="1 for the model version this replica serves (tag: version).",
            tag_keys=("component", "version"),
        )
        self.model_version.set_default_tags(dict(tags))
        self.events = Counter(
            "scalerec_events_appended",
            description="User events appended durably by POST /events.",
            tag_keys=("component",),
        )
        self.events.set_default_tags(dict(tags))
        self._version: str | None = None
        self.pending = LocalCounts()
        self._flush_scheduled = False

    def count(self, counter: str, n: int = 1, **tags: str) -> None:
        """Add ``n`` to the counter attribute ``counter`` (``requests``, ``cache``, ``events``).

        Pushed to Ray within ``FLUSH_S`` (by a timer on the running event loop, or at once
        where there is none).
        """
        self.pending.add(counter, n, **tags)
        if self._flush_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._flush_scheduled = True
        loop.call_later(FLUSH_S, self.flush)

    def flush(self) -> None:
        """Push the counts added up so far to Ray."""
        self._flush_scheduled = False
        for name, tags, n in self.pending.drain():
            counter: Counter = getattr(self, name)
            counter.inc(n, tags=tags)

    def set_version(self, version: str) -> None:
        """Mark ``version`` as served (and the previous one as no longer served)."""
        if version == self._version:
            return
        if self._version is not None:
            self.model_version.set(0, tags={"version": self._version})
        self.model_version.set(1, tags={"version": version})
        self._version = version
