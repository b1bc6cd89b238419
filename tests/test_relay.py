"""The hand-off of item results from worker threads to the event loop (d2v_serve/core/relay.py) and the
preprocessing byte budget (core.budget.ByteBudget): results, failures, cancellation, one loop wake-up per burst,
waiting and release; the gauges read at scrape time."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest

from d2v_serve.core.engine import ByteBudget
from d2v_serve.core.relay import Relay
from d2v_serve.errors import ServeError, deadline_exceeded


def _futures(n: int) -> list[concurrent.futures.Future]:
    return [concurrent.futures.Future() for _ in range(n)]


def _complete_later(futures: list[concurrent.futures.Future], outcomes: list[object]) -> threading.Thread:
    """Complete the futures from another thread, like the batcher's delivery thread, in one burst."""
    def run() -> None:
        for f, outcome in zip(futures, outcomes, strict=True):
            if not f.set_running_or_notify_cancel():
                continue
            if isinstance(outcome, BaseException):
                f.set_exception(outcome)
            else:
                f.set_result(outcome)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_results_come_back_in_order_with_one_wake_up_per_burst() -> None:
    async def main() -> tuple[list[object], int]:
        relay = Relay()
        loop = asyncio.get_running_loop()
        wakeups = 0
        original = loop.call_soon_threadsafe

        def counting(callback, *args, **kwargs):  # noqa: ANN001, ANN202 - a pass-through spy
            nonlocal wakeups
            wakeups += 1
            return original(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        futures = _futures(16)
        task = asyncio.ensure_future(relay.gather(futures))
        await asyncio.sleep(0)  # its callbacks are registered
        _complete_later(futures, list(range(16))).join()  # the loop is blocked: the whole burst lands first
        results = await task
        return results, wakeups

    results, wakeups = asyncio.run(main())
    assert results == list(range(16))
    assert wakeups == 1


def test_results_already_there_and_several_callers_each_get_their_own() -> None:
    async def main() -> list[list[object]]:
        relay = Relay()
        done = _futures(2)
        for i, f in enumerate(done):
            f.set_result(f"done-{i}")
        a, b = _futures(3), _futures(1)
        calls = [asyncio.ensure_future(relay.gather(done)), asyncio.ensure_future(relay.gather(a)),
                 asyncio.ensure_future(relay.gather(b))]
        await asyncio.sleep(0)
        threads = [_complete_later(b, ["b0"]), _complete_later(a, ["a0", "a1", "a2"])]
        out = await asyncio.gather(*calls)
        for t in threads:
            t.join()
        return out

    assert asyncio.run(main()) == [["done-0", "done-1"], ["a0", "a1", "a2"], ["b0"]]


def test_the_first_failure_returns_at_once_and_cancels_the_rest() -> None:
    async def main() -> tuple[ServeError, list[bool]]:
        relay = Relay()
        futures = _futures(3)
        task = asyncio.ensure_future(relay.gather(futures))
        await asyncio.sleep(0)
        _complete_later(futures[1:2], [deadline_exceeded("too late")]).join()  # the others never finish
        with pytest.raises(ServeError) as info:
            await asyncio.wait_for(task, 5)
        return info.value, [f.cancelled() for f in futures]

    error, cancelled = asyncio.run(main())
    assert error.message == "too late"
    assert cancelled == [True, False, True]


def test_cancelling_the_caller_cancels_its_queued_items() -> None:
    async def main() -> list[bool]:
        relay = Relay()
        futures = _futures(2)
        futures[0].set_running_or_notify_cancel()  # already in a batch: it cannot be cancelled, it finishes
        task = asyncio.ensure_future(relay.gather(futures))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        futures[0].set_result("late")
        await asyncio.sleep(0.01)  # its flush finds the caller gone, quietly
        return [f.cancelled() for f in futures]

    assert asyncio.run(main()) == [False, True]


def test_byte_budget_takes_what_is_free_and_makes_the_rest_wait() -> None:
    async def main() -> list[str]:
        budget = ByteBudget(100)
        order: list[str] = []

        async def hold(name: str, n: int, seconds: float) -> None:
            async with budget.hold(n):
                order.append(f"{name}+")
                assert budget.used <= budget.limit
                await asyncio.sleep(seconds)
            order.append(f"{name}-")

        first = asyncio.ensure_future(hold("a", 60, 0.05))
        await asyncio.sleep(0)
        assert budget.used == 60
        # b waits for a; c (bigger than the whole budget) waits until the budget is free and then runs alone
        await asyncio.gather(first, hold("b", 50, 0.01), hold("c", 10_000, 0.01))
        assert budget.used == 0 and budget.waiting == 0
        return order

    order = asyncio.run(main())
    assert order.index("a-") < order.index("b+")
    c_in, c_out = order.index("c+"), order.index("c-")
    assert not [x for x in order[c_in + 1: c_out] if x.endswith("+")]  # nothing else took the budget while c held it
    assert "b+" in order and "b-" in order


def test_byte_budget_wait_can_be_cancelled() -> None:
    async def main() -> int:
        budget = ByteBudget(10)
        async with budget.hold(10):
            waiter = asyncio.ensure_future(budget.hold(5).__aenter__())
            await asyncio.sleep(0.01)
            assert budget.waiting == 1
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
        return budget.used + budget.waiting

    assert asyncio.run(main()) == 0


def test_gauges_are_read_when_scraped_and_read_zero_once_their_owner_is_gone() -> None:
    import gc

    from prometheus_client import REGISTRY

    from d2v_serve.core.batcher import Batcher, BatchPolicy

    class NoRunner:
        output_names = ["last_hidden_state", "output_mask"]

    def depth() -> float | None:
        return REGISTRY.get_sample_value("d2v_queue_depth", {"model": "gauge-test"})

    batcher = Batcher("gauge-test", "text", NoRunner(), BatchPolicy())
    batcher.reserve(3)
    assert depth() == 3
    batcher.release(2)
    assert depth() == 1
    del batcher
    gc.collect()
    assert depth() == 0

    async def main() -> list[float | None]:
        budget = ByteBudget(100)
        seen = []
        async with budget.hold(40):
            seen.append(REGISTRY.get_sample_value("d2v_preprocess_bytes"))
        seen.append(REGISTRY.get_sample_value("d2v_preprocess_bytes"))
        return seen

    assert asyncio.run(main()) == [40, 0]


def test_a_relay_outlives_its_event_loop() -> None:
    relay = Relay()

    async def one(value: str) -> list[object]:
        futures = _futures(1)
        task = asyncio.ensure_future(relay.gather(futures))
        await asyncio.sleep(0)
        _complete_later(futures, [value]).join()
        return await asyncio.wait_for(task, 5)

    assert asyncio.run(one("first")) == ["first"]
    late = _futures(1)  # a result that lands after its loop closed is dropped, and does not block the next loop
    relay._push(None, 0, late[0])  # type: ignore[arg-type] - never settled: the loop is closed
    assert asyncio.run(one("second")) == ["second"]
