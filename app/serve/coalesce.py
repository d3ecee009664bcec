"""Natural batching for an async call whose cost is per call, not per item.

``@serve.batch`` forms its next batch while the previous one is still running: with a batch
function that awaits another deployment, every batch closes after ``batch_wait_timeout_s`` with
the one or two requests that arrived, and the batches then queue behind
``max_concurrent_batches``. Under load that means about one handle call per request, executed
one after another.

``Coalescer`` batches the other way round: a call starts when fewer than ``max_in_flight``
are running, and everything that arrives while the calls are busy goes out together in the
next one (batches grow with load, up to ``max_batch``).

With ``max_wait_s`` > 0 a batch that is not full waits for the *wave*: as many items as
were recently inside at once (waiting plus being computed, the peak over the last
``window_s``), or ``max_wait_s`` after its oldest item, whichever comes first. Without it, a
closed loop of C clients settles into two groups of C/2 (one computed while the other's
answers travel back and its next requests arrive), and a small product costs nearly as much
as a full one (docs/performance.md). The wave merges them into one pass. An idle caller never
waits: the peak of a lone request is 1.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    """Send items to ``fn`` in batches, at most ``max_in_flight`` calls at a time.

    Args:
        fn: Async function from a list of items to the list of their results (same order).
        max_batch: Most items in one call.
        max_in_flight: Most concurrent calls (2 keeps the callee busy while one answer travels).
        max_wait_s: Longest the oldest waiting item waits for the wave (0: send at once).
        window_s: How long a peak of concurrent items sets the wave size.
    """

    def __init__(
        self,
        fn: Callable[[list[T]], Awaitable[list[R]]],
        max_batch: int,
        max_in_flight: int = 2,
        max_wait_s: float = 0.0,
        window_s: float = 1.0,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be >= 1")
        if max_wait_s < 0 or window_s <= 0:
            raise ValueError("max_wait_s must be >= 0 and window_s > 0")
        self.fn = fn
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.max_wait_s = max_wait_s
        self.window_s = window_s
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._in_flight = 0
        self._running_items = 0
        # Peak of items inside (pending + running) in the current and the previous window.
        self._window_start = 0.0
        self._peak = 0
        self._prev_peak = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.calls = 0
        """Calls made so far (items / calls is the mean batch size)."""
        self.items = 0

    async def __call__(self, item: T) -> R:
        """Result of ``item``, computed in whichever batch it joins."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        now = loop.time()
        if not self._pending:
            self._deadline = now + self.max_wait_s
        self._pending.append((item, fut))
        self._note_peak(now, len(self._pending) + self._running_items)
        self._kick()
        return await fut

    def wave(self) -> int:
        """Batch size to wait for: the recent peak of concurrent items (at most ``max_batch``)."""
        now = asyncio.get_running_loop().time()
        self._note_peak(now, 0)
        return max(1, min(self.max_batch, max(self._peak, self._prev_peak)))

    def _note_peak(self, now: float, inside: int) -> None:
        if now - self._window_start >= self.window_s:
            gone = now - self._window_start >= 2 * self.window_s
            self._prev_peak = 0 if gone else self._peak
            self._peak = 0
            self._window_start = now
        self._peak = max(self._peak, inside)

    def _kick(self) -> None:
        """Send what is pending once a call slot is free and the wave is in (or time is up)."""
        if not self._pending or self._in_flight >= self.max_in_flight:
            return  # a finishing call kicks again
        loop = asyncio.get_running_loop()
        if (
            not self.max_wait_s
            or len(self._pending) >= self.wave()
            or loop.time() >= self._deadline
        ):
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._send()
        elif self._timer is None:
            self._timer = loop.call_at(self._deadline, self._on_deadline)

    def _on_deadline(self) -> None:
        self._timer = None
        self._kick()

    def _send(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending and self._in_flight < self.max_in_flight:
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            self._in_flight += 1
            self._running_items += len(batch)
            self.calls += 1
            self.items += len(batch)
            task = loop.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self.fn([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch function returned {len(results)} for {len(batch)}")
            for (_, fut), res in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(res)
        except Exception as exc:  # every waiting caller gets the error, none hangs
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
        finally:
            self._in_flight -= 1
            self._running_items -= len(batch)
            self._kick()
