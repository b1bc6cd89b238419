"""The byte budget of preprocessing: how many bytes of encoded input are being decoded at once."""

from __future__ import annotations

import asyncio

from .. import metrics


class ByteBudget:
    """Bytes of encoded input being preprocessed at once. A request larger than the whole budget waits until the
    budget is free and then runs alone, so any request the message limit lets in can still be served."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.waiting = 0
        self._changed = asyncio.Condition()
        metrics.gauge_from(metrics.PREPROCESS_BYTES, self, lambda b: b.used)

    def hold(self, n: int) -> _Held:
        """`async with budget.hold(n):` holds min(n, limit) bytes of the budget."""
        return _Held(self, min(n, self.limit))


class _Held:
    """A hold on a ByteBudget. Taking what is free costs no lock (one event loop thread runs all of this); only a
    request that has to wait, and a release while some do, go through the condition."""

    __slots__ = ("budget", "n")

    def __init__(self, budget: ByteBudget, n: int) -> None:
        self.budget, self.n = budget, n

    async def __aenter__(self) -> None:
        b, n = self.budget, self.n
        if b.used + n > b.limit:
            b.waiting += 1
            try:
                async with b._changed:
                    await b._changed.wait_for(lambda: b.used + n <= b.limit)
            finally:
                b.waiting -= 1
        b.used += n

    async def __aexit__(self, *exc: object) -> None:
        b = self.budget
        b.used -= self.n
        if b.waiting:
            async with b._changed:
                b._changed.notify_all()
