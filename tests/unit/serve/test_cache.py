"""The answer cache: LRU eviction, expiry, the byte bound, hashed long keys, off at size 0."""

from __future__ import annotations

import threading

import numpy as np

from app.serve import TTLCache
from app.serve.answers import (
    ENTRY_OVERHEAD_BYTES,
    MAX_KEY_BYTES,
    CacheStats,
    cache_key,
    estimate_bytes,
    rec_key,
)
from app.serve.schema import ItemScore, RecommendResponse


def _answer(user: str, k: int = 10) -> RecommendResponse:
    rng = np.random.default_rng(len(user))
    return RecommendResponse.model_construct(
        user_id=user,
        items=[
            ItemScore.model_construct(item_id=f"i{i}", score=s)
            for i, s in zip(range(k), rng.random(k).tolist(), strict=True)
        ],
        model_version="20260101T000000-abcdef12",
        cached=False,
        strategy="personal",
        history_version=0,
    )


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


def test_byte_bound_holds_under_many_large_entries() -> None:
    size = 1000 + ENTRY_OVERHEAD_BYTES
    cache: TTLCache[str] = TTLCache(10**6, 60, max_bytes=50 * size, sizeof=len)
    for n in range(2000):
        cache.put(n, "x" * 1000)
        assert cache.nbytes <= cache.max_bytes
    # every entry costs its key (the repr, 4 bytes for "1999") + value + overhead
    assert len(cache) == cache.max_bytes // (size + 4)
    assert cache.get(1999) == "x" * 1000 and cache.get(0) is None
    assert cache.evictions == 2000 - len(cache)
    assert cache.nbytes == sum(len(repr(n)) + size for n in range(2000 - len(cache), 2000))


def test_byte_bound_with_real_answers_and_the_default_estimate() -> None:
    one = estimate_bytes(_answer("u0"))
    assert 3_000 < one < 12_000  # about 7 KB for 10 items (docstring of estimate_bytes)
    cache: TTLCache[RecommendResponse] = TTLCache(10**6, 60, max_bytes=100 * one)
    for u in range(1000):
        cache.put(rec_key("v1", f"u{u}", 0, 10), _answer(f"u{u}"))
        assert cache.nbytes <= cache.max_bytes
    assert 80 <= len(cache) < 100
    assert estimate_bytes(_answer("u0", k=100)) > 8 * one  # grows with the list


def test_replacing_an_entry_counts_it_once_and_oversized_values_are_not_stored() -> None:
    cache: TTLCache[str] = TTLCache(10, 60, max_bytes=10_000, sizeof=len)
    cache.put("a", "x" * 100)
    cache.put("a", "y" * 300)
    assert len(cache) == 1 and cache.nbytes == len(cache_key("a")) + 300 + ENTRY_OVERHEAD_BYTES
    cache.put("b", "z" * 20_000)  # larger than the whole cache: skipped, nothing evicted
    assert cache.get("b") is None and cache.get("a") == "y" * 300
    cache.put("a", "w" * 20_000)  # an oversized replacement drops the stale value
    assert cache.get("a") is None and (len(cache), cache.nbytes) == (0, 0)


def test_eviction_is_least_recently_used_first_by_bytes() -> None:
    entry = 100 + ENTRY_OVERHEAD_BYTES + 3  # keys "'a'" ... are 3 bytes
    cache: TTLCache[str] = TTLCache(100, 60, max_bytes=3 * entry, sizeof=len)
    for key in "abc":
        cache.put(key, "x" * 100)
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("d", "x" * 100)  # evicts b
    assert [cache.get(k) is not None for k in "abcd"] == [True, False, True, True]
    cache.put("e", "x" * (100 + entry))  # needs two slots: evicts the two least recent (a, c)
    assert [cache.get(k) is not None for k in "acde"] == [False, False, True, True]


def test_long_keys_are_hashed_short_keys_kept() -> None:
    short = rec_key("v1", "u1", 0, 10)
    assert cache_key(short) == repr(short).encode()
    ids = [f"item-{i}" for i in range(1000)]
    long_a = rec_key("v1", "u1", 0, 10, ids, ids)
    long_b = rec_key("v1", "u1", 0, 10, ids, ids[:-1] + ["item-x"])  # differs in one id
    assert len(repr(long_a)) > 10_000
    ka, kb = cache_key(long_a), cache_key(long_b)
    assert len(ka) == len(kb) == 34 and ka != kb
    assert cache_key(long_a) == ka  # deterministic
    # no two of many long keys share a digest
    many = {cache_key(rec_key("v1", f"u{u}", 0, 10, ids)) for u in range(5000)}
    assert len(many) == 5000
    # at the threshold a key is kept; one byte over, it is hashed
    pad = "x" * (MAX_KEY_BYTES - 2)
    assert cache_key(pad) == repr(pad).encode() and len(cache_key(pad + "y")) == 34

    cache: TTLCache[str] = TTLCache(10, 60, max_bytes=10_000, sizeof=len)
    cache.put(long_a, "answer a")
    assert cache.get(long_a) == "answer a" and cache.get(long_b) is None
    cache.put(long_b, "answer b")
    assert cache.get(long_b) == "answer b" and cache.get(long_a) == "answer a"
    # each long key costs its digest, not its kilobytes
    assert cache.nbytes == 2 * (34 + len("answer a") + ENTRY_OVERHEAD_BYTES)


def test_expired_entries_release_their_bytes_and_stats() -> None:
    now = [0.0]
    cache: TTLCache[str] = TTLCache(10, ttl_s=5, max_bytes=10_000, clock=lambda: now[0], sizeof=len)
    cache.put("a", "x" * 50)
    cache.put("b", "x" * 50)
    now[0] = 6
    assert cache.get("a") is None
    assert cache.stats() == CacheStats(
        entries=1,
        bytes=3 + 50 + ENTRY_OVERHEAD_BYTES,
        max_entries=10,
        max_bytes=10_000,
        hits=0,
        misses=1,
        evictions=0,
    )
    cache.clear()
    assert (len(cache), cache.nbytes) == (0, 0)


def test_zero_bytes_disables_the_cache() -> None:
    cache: TTLCache[str] = TTLCache(10, 60, max_bytes=0)
    assert not cache.enabled
    cache.put("a", "x")
    assert cache.get("a") is None and len(cache) == 0 and cache.misses == 1


def test_byte_count_stays_exact_under_threads() -> None:
    # ``Answers.warm`` fills the cache from a worker thread while the event loop uses it
    cache: TTLCache[str] = TTLCache(500, 60, max_bytes=40_000, sizeof=len)

    def hammer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for n in rng.integers(0, 300, 3000).tolist():
            if n % 3:
                cache.put(n, "x" * (n % 97))
            else:
                cache.get(n)

    threads = [threading.Thread(target=hammer, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held = sum(size for _, _, size in cache._data.values())
    assert cache.nbytes == held <= cache.max_bytes
