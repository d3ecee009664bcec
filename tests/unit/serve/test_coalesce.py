"""Natural batching: batches grow with load, no wait when idle, errors reach every caller."""

from __future__ import annotations

import asyncio
import time

import pytest

from app.serve.coalesce import Coalescer


class Recorder:
    """A batch function that doubles its inputs and records batches and concurrency."""

    def __init__(self, delay_s: float = 0.01, fail_on: int | None = None) -> None:
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.batches: list[list[int]] = []
        self.running = 0
        self.max_running = 0

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await asyncio.sleep(self.delay_s)
            if self.fail_on is not None and self.fail_on in items:
                raise ValueError(f"bad item {self.fail_on}")
            return [2 * x for x in items]
        finally:
            self.running -= 1


def test_single_call_goes_out_alone_and_at_once() -> None:
    fn = Recorder(delay_s=0.0)

    async def main() -> int:
        c: Coalescer[int, int] = Coalescer(fn, max_batch=8)
        return await c(21)

    assert asyncio.run(main()) == 42
    assert fn.batches == [[21]]


@pytest.mark.parametrize("in_flight", [1, 2])
def test_concurrent_calls_are_batched_and_bounded(in_flight: int) -> None:
    fn = Recorder()

    async def main() -> list[int]:
        c: Coalescer[int, int] = Coalescer(fn, max_batch=5, max_in_flight=in_flight)
        out = await asyncio.gather(*(c(i) for i in range(20)))
        assert c.items == 20 and c.calls == len(fn.batches)
        return list(out)

    assert asyncio.run(main()) == [2 * i for i in range(20)]
    # The first `in_flight` calls leave at once; the rest wait and go out in full batches.
    assert [len(b) for b in fn.batches[:in_flight]] == [1] * in_flight
    assert all(len(b) <= 5 for b in fn.batches)
    assert len(fn.batches) < 20
    assert fn.max_running == in_flight
    assert sorted(x for b in fn.batches for x in b) == list(range(20))


def test_error_reaches_every_caller_of_the_batch_and_later_calls_work() -> None:
    fn = Recorder(fail_on=3)

    async def main() -> tuple[list[object], int]:
        c: Coalescer[int, int] = Coalescer(fn, max_batch=8, max_in_flight=1)
        first = await asyncio.gather(*(c(i) for i in range(6)), return_exceptions=True)
        return list(first), await c(10)

    first, later = asyncio.run(main())
    failed_batch = next(b for b in fn.batches if 3 in b)
    for i, res in enumerate(first):
        if i in failed_batch:
            assert isinstance(res, ValueError) and "bad item 3" in str(res)
        else:
            assert res == 2 * i
    assert later == 20


def test_wrong_result_length_is_an_error_not_a_hang() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    async def main() -> None:
        c: Coalescer[int, int] = Coalescer(short, max_batch=4)
        await asyncio.wait_for(c(1), timeout=5)

    with pytest.raises(RuntimeError, match="returned 0 for 1"):
        asyncio.run(main())


def test_bad_limits_are_rejected() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        Coalescer(Recorder(), max_batch=0)


async def _arrive_over_turns(c: Coalescer[int, int], n: int, gap_turns: int) -> list[int]:
    """``n`` callers, each joining ``gap_turns`` event-loop turns after the previous one."""

    async def late(i: int) -> int:
        for _ in range(i * gap_turns):
            await asyncio.sleep(0)
        return await c(i)

    return list(await asyncio.gather(*(late(i) for i in range(n))))


async def _peak_of(c: Coalescer[int, int], n: int) -> None:
    """``n`` concurrent callers: the coalescer's recent peak becomes ``n``."""
    assert await asyncio.gather(*(c(100 + i) for i in range(n))) == [200 + 2 * i for i in range(n)]


def test_wave_spread_over_loop_turns_goes_out_together() -> None:
    # After a peak of 6 concurrent requests, the next 6 (read from sockets over several
    # event-loop turns) go out as one batch instead of 1 + 5.
    waited, eager = Recorder(delay_s=0.0), Recorder(delay_s=0.0)

    async def main() -> float:
        c: Coalescer[int, int] = Coalescer(waited, max_batch=8, max_in_flight=1, max_wait_s=0.2)
        await _peak_of(c, 6)
        e: Coalescer[int, int] = Coalescer(eager, max_batch=8, max_in_flight=1)
        await _peak_of(e, 6)
        waited.batches.clear()
        eager.batches.clear()
        t0 = time.perf_counter()
        assert await _arrive_over_turns(c, 6, gap_turns=2) == [0, 2, 4, 6, 8, 10]
        elapsed = time.perf_counter() - t0
        assert await _arrive_over_turns(e, 6, gap_turns=2) == [0, 2, 4, 6, 8, 10]
        assert c.wave() == 6
        return elapsed

    elapsed = asyncio.run(main())
    assert waited.batches == [[0, 1, 2, 3, 4, 5]]
    assert elapsed < 0.15  # the wave filled: no wait for the deadline
    assert eager.batches[0] == [0]  # no wait: the first request leaves alone


def test_idle_request_never_waits() -> None:
    fn = Recorder(delay_s=0.0)

    async def main() -> float:
        c: Coalescer[int, int] = Coalescer(fn, max_batch=8, max_in_flight=1, max_wait_s=5.0)
        t0 = time.perf_counter()
        assert await c(7) == 14
        return time.perf_counter() - t0

    assert asyncio.run(main()) < 1.0
    assert fn.batches == [[7]]


def test_max_wait_bounds_the_wait_after_load_drops_and_the_peak_expires() -> None:
    fn = Recorder(delay_s=0.0)

    async def main() -> tuple[float, float]:
        c: Coalescer[int, int] = Coalescer(
            fn, max_batch=8, max_in_flight=1, max_wait_s=0.1, window_s=0.2
        )
        await _peak_of(c, 5)
        t0 = time.perf_counter()
        assert await c(7) == 14  # waits for a wave of 5 that never comes, 0.1 s at most
        lone = time.perf_counter() - t0
        await asyncio.sleep(0.45)  # two windows without traffic: the peak is forgotten
        assert c.wave() == 1
        t0 = time.perf_counter()
        assert await c(8) == 16
        return lone, time.perf_counter() - t0

    lone, later = asyncio.run(main())
    assert 0.08 <= lone < 0.5
    assert later < 0.05
    assert fn.batches[-2:] == [[7], [8]]


def test_bad_wait_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="max_wait_s"):
        Coalescer(Recorder(), max_batch=1, max_wait_s=-1.0)
    with pytest.raises(ValueError, match="window_s"):
        Coalescer(Recorder(), max_batch=1, window_s=0.0)
