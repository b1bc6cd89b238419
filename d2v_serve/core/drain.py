"""The drain: which calls are in flight, refusing new ones once draining, waiting for the rest, cutting them off."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator

from .. import metrics


class Drain:
    """Counts the calls in flight. Once `begin` is called every new call fails with UNAVAILABLE while the admitted
    ones finish (`wait_idle`); `cut` cancels those still running when the grace is over. `on_idle` runs each time the
    last call in flight ends."""

    def __init__(self, on_idle: Callable[[], None] = lambda: None) -> None:
        self.draining = False
        self.cutting = False  # the drain's grace is over: calls still in flight are being cancelled
        self.last_call_at = 0.0  # time.monotonic() of the latest call's arrival
        self._inflight = 0
        self._tasks: set[asyncio.Task] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._on_idle = on_idle
        metrics.gauge_from(metrics.INFLIGHT, self, lambda drain: drain._inflight)

    def begin(self) -> None:
        """Refuse new work with UNAVAILABLE; calls already admitted finish."""
        self.draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is in flight; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except (TimeoutError, asyncio.TimeoutError):  # distinct classes before Python 3.11
            return False

    async def wait_quiet(self, quiet_s: float, timeout: float) -> None:
        """Wait until no call has arrived for `quiet_s` (at most `timeout`): while draining, calls racing the
        shutdown still get their UNAVAILABLE from us instead of a CANCELLED from the closing transport."""
        end = time.monotonic() + timeout
        while (now := time.monotonic()) < end and now - self.last_call_at < quiet_s:
            await asyncio.sleep(min(quiet_s, end - now) / 4)

    def cut(self) -> int:
        """The grace is over: cancel the calls still in flight (they answer UNAVAILABLE). Returns how many."""
        self.cutting = True
        for task in self._tasks:
            task.cancel()
        return len(self._tasks)

    @contextlib.contextmanager
    def tracked(self) -> Iterator[None]:
        """Count the current task as a call in flight (the drain waits for it, `cut` cancels it)."""
        self.last_call_at = time.monotonic()
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._inflight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._tasks.discard(task)
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()
                self._on_idle()
