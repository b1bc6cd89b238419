"""Item results from the model workers' threads to the event loop: one loop wake-up per burst of finished inputs
(a batch's worth), not one per input as `asyncio.wrap_future` does. On a short-input workload the per-input
wake-ups (a self-pipe write on the worker side, a read, a callback and a future on the loop side) cost about as much
CPU as the rest of the request path."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Sequence
from typing import Any

Done = tuple["_Waiter", int, concurrent.futures.Future]


class _Waiter:
    """One caller's items: its loop future resolves when all are done (their results collected as they come, one
    look at each future), or at the first that failed (`failed`)."""

    __slots__ = ("failed", "future", "remaining", "results")

    def __init__(self, future: asyncio.Future, count: int) -> None:
        self.future, self.remaining = future, count
        self.results: list[Any] = [None] * count
        self.failed = False

    def settle(self, index: int, item: concurrent.futures.Future) -> None:
        if self.future.done():
            return
        try:
            self.results[index] = item.result()  # done: at once
        except BaseException:  # noqa: BLE001 - failed or cancelled: the caller finds which
            self.failed = True
            self.future.set_result(None)
            return
        self.remaining -= 1
        if self.remaining == 0:
            self.future.set_result(None)


class Relay:
    """Bound to the event loop of its latest `gather`; worker threads complete the items' concurrent futures."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._done: list[Done] = []
        self._scheduled = False

    async def gather(self, futures: Sequence[concurrent.futures.Future]) -> list[Any]:
        """The futures' results in order. At the first failure the call returns: a failed item's error is raised
        and the rest are cancelled (those still queued are dropped at dequeue); cancelling the caller cancels them
        too."""
        if not futures:
            return []
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # first use, or a new loop (the old one is gone, and with it its callers)
            with self._lock:
                self._loop, self._done, self._scheduled = loop, [], False
        waiter = _Waiter(self._loop.create_future(), len(futures))
        for i, f in enumerate(futures):
            f.add_done_callback(lambda item, w=waiter, i=i: self._push(w, i, item))
        try:
            await waiter.future
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        if not waiter.failed:
            return waiter.results
        first = next(f for f in futures if f.done() and (f.cancelled() or f.exception() is not None))  # in order
        for f in futures:
            f.cancel()
        if first.cancelled():
            raise asyncio.CancelledError()
        raise first.exception()  # type: ignore[misc] - checked above

    def _push(self, waiter: _Waiter, index: int, item: concurrent.futures.Future) -> None:
        """Any thread: note a finished item; the first of a burst schedules the loop's `_flush`."""
        with self._lock:
            self._done.append((waiter, index, item))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._flush)  # type: ignore[union-attr] - bound before any push
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            with self._lock:
                self._done, self._scheduled = [], False

    def _flush(self) -> None:
        with self._lock:
            done, self._done, self._scheduled = self._done, [], False
        for waiter, index, item in done:
            waiter.settle(index, item)
