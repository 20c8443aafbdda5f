"""The micro-batcher of ``cascade serve``: concurrent requests share one routed batch."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cascade.core.errors import CascadeError


@dataclass
class _Waiting:
    payload: Any
    size: int
    future: asyncio.Future


class MicroBatcher:
    """Collects concurrent requests into batches and splits the answers back per request.

    An idle batcher routes a request at once; requests batch only while ``route`` is busy:
    the next batch is everything queued by then, up to ``max_batch`` rows (a single request
    larger than ``max_batch`` is a batch of its own). ``max_wait_s`` > 0 makes a batch wait
    that long after its first request for more (a trade of latency for batch size; off by
    default). ``route(payloads)`` runs for one batch at a time; ``resolve(payloads, routed)``
    then runs as its own task (batches overlap there: oracle calls) and returns one answer
    per row, in the order of the payloads' rows; request ``i`` gets its ``size`` rows.
    An exception in either step is set on every request of the batch.

    Args:
        route: ``async (payloads) -> routed``.
        resolve: ``async (payloads, routed) -> list`` of ``sum(sizes)`` answers.
        max_batch: rows per batch.
        max_wait_s: how long a batch waits for more requests after its first (0: not at all).
        on_batch: called with each batch's row count (metrics).
    """

    def __init__(self, route: Callable[[list], Awaitable[Any]], resolve: Callable[[list, Any], Awaitable[list]],
                 *, max_batch: int = 64, max_wait_s: float = 0.0, on_batch: Callable[[int], None] | None = None):
        if max_batch < 1:
            raise CascadeError(f"max batch {max_batch}: must be at least 1")
        if not max_wait_s >= 0:
            raise CascadeError(f"max wait {max_wait_s}: must be at least 0")
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self._route, self._resolve, self._on_batch = route, resolve, on_batch
        self._queue: asyncio.Queue[_Waiting] = asyncio.Queue()
        self._held: _Waiting | None = None  # the request that did not fit in the last batch
        self._loop_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._routing = False  # a batch is in ``route``

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing being routed."""
        return not self._routing and self._held is None and self._queue.empty()

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def submit(self, payload: Any, size: int) -> list:
        """Queue one request of ``size`` rows; its ``size`` answers.

        Raises:
            RuntimeError: the batcher is not running (started, or stopped).
            Exception: whatever the batch's ``route`` or ``resolve`` raised.
        """
        if self._loop_task is None or self._loop_task.done():
            raise RuntimeError("the server is not accepting requests (starting or shutting down)")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Waiting(payload, size, future))
        return await future

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop batching; let batches in flight finish (up to ``timeout_s``), and answer
        every request still queued with an error."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for t in late:
                t.cancel()
        waiting = [self._held] if self._held else []
        while not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        self._fail(waiting, RuntimeError("the server is shutting down"))

    async def _next(self, timeout: float | None) -> _Waiting | None:
        if self._held is not None:
            item, self._held = self._held, None
            return item
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            with contextlib.suppress(asyncio.QueueEmpty):
                return self._queue.get_nowait()
            return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(None)
            batch, rows = [first], first.size
            deadline = loop.time() + self.max_wait_s
            while rows < self.max_batch:  # what queued while the last batch was routed, no waiting
                item = await self._next(deadline - loop.time() if self.max_wait_s > 0 else 0.0)
                if item is None:
                    break
                if rows + item.size > self.max_batch:
                    self._held = item  # first in the next batch
                    break
                batch.append(item)
                rows += item.size
            batch = [w for w in batch if not w.future.done()]  # a client that went away
            if not batch:
                continue
            if self._on_batch is not None:
                self._on_batch(sum(w.size for w in batch))
            payloads = [w.payload for w in batch]
            self._routing = True
            try:
                routed = await self._route(payloads)
            except asyncio.CancelledError:  # stopped while routing: answer, then stop
                self._fail(batch, RuntimeError("the server is shutting down"))
                raise
            except Exception as exc:  # noqa: BLE001  (every waiting request gets it; the loop goes on)
                self._fail(batch, exc)
                continue
            finally:
                self._routing = False
            task = loop.create_task(self._finish(batch, payloads, routed))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _finish(self, batch: list[_Waiting], payloads: list, routed: Any) -> None:
        try:
            answers = await self._resolve(payloads, routed)
            total = sum(w.size for w in batch)
            if len(answers) != total:
                raise RuntimeError(f"resolve gave {len(answers)} answers for {total} rows")
        except BaseException as exc:  # cancelled at shutdown too: answer, then re-raise
            self._fail(batch, exc if isinstance(exc, Exception) else RuntimeError("the server is shutting down"))
            if not isinstance(exc, Exception):
                raise
            return
        start = 0
        for w in batch:
            if not w.future.done():
                w.future.set_result(answers[start:start + w.size])
            start += w.size

    @staticmethod
    def _fail(batch: Sequence[_Waiting], exc: BaseException) -> None:
        for w in batch:
            if not w.future.done():
                w.future.set_exception(exc)
