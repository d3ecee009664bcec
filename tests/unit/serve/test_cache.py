"""The answer cache: LRU eviction, expiry after its time to live, and off at size 0."""

from __future__ import annotations

from app.serve import TTLCache


def test_ttl_cache_lru_and_expiry() -> None:
    now = [0.0]
    cache: TTLCache[int] = TTLCache(2, ttl_s=10, clock=lambda: now[0])
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1
    cache.put("c", 3)  # evicts b, the least recently used
    assert cache.get("b") is None and cache.get("c") == 3
    now[0] = 11
    assert cache.get("a") is None
    assert (cache.hits, cache.misses) == (2, 2)
    assert TTLCache(0, 1).get("x") is None
