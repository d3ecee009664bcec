"""Counters add up in the replica and reach Ray in one push per interval, nothing lost."""

from __future__ import annotations

import asyncio

from app.serve import metrics as metrics_mod
from app.serve.metrics import LocalCounts, ServeMetrics


def test_local_counts_add_up_per_counter_and_tags_then_reset() -> None:
    c = LocalCounts()
    c.add("requests", endpoint="/recommend", status="200")
    c.add("requests", status="200", endpoint="/recommend")  # same tags, any order
    c.add("requests", endpoint="/recommend", status="422")
    c.add("events", 5)
    assert sorted(c.drain(), key=str) == sorted(
        [
            ("requests", {"endpoint": "/recommend", "status": "200"}, 2),
            ("requests", {"endpoint": "/recommend", "status": "422"}, 1),
            ("events", {}, 5),
        ],
        key=str,
    )
    assert c.drain() == [] and len(c) == 0


def test_counts_on_an_event_loop_are_pushed_once_per_interval(monkeypatch) -> None:
    monkeypatch.setattr(metrics_mod, "FLUSH_S", 0.05)
    m = ServeMetrics("ingress")
    pushed: list[tuple[str, int]] = []
    monkeypatch.setattr(m.requests, "inc", lambda n=1, tags=None: pushed.append(("req", n)))
    monkeypatch.setattr(m.cache, "inc", lambda n=1, tags=None: pushed.append(("cache", n)))

    async def main() -> None:
        for _ in range(10):
            m.count("requests", endpoint="/recommend", status="200")
            m.count("cache", result="miss")
        assert pushed == []  # added up, not pushed per request
        await asyncio.sleep(0.2)

    asyncio.run(main())
    assert sorted(pushed) == [("cache", 10), ("req", 10)]
    m.count("cache", result="hit")  # no event loop: pushed at once
    assert pushed[-1] == ("cache", 1)
