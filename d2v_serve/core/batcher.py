"""One batcher per model: a bounded queue drained by one worker thread that owns the model's session.

The worker forms the next batch the moment the session is free, from everything queued: expired and cancelled
inputs are dropped at dequeue, the oldest input is always taken, and the batch grows with its neighbours in length
order (within a window of queued inputs, kept sorted by length as they arrive) while what it will compute (inputs x
longest, attention's length-squared term included) stays within the fill target and the budget, and its padded
share within `max_padding`. A batch that is not full waits, at most `max_delay_s`, only while more inputs are known
to be on their way (inputs being preprocessed, or as many as the last batches answered: closed-loop clients come
back), so a tiny batch does not start just before a full one's worth arrives. Per-input results (pooling, packing)
are finished on a second thread, a batch at a time, overlapping the next run.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import metrics
from ..backend.runner import Runner
from ..errors import ServeError, deadline_exceeded, internal, resource_exhausted, unavailable
from ..preprocess import collate
from ..tracing import BatchRun

log = logging.getLogger(__name__)

OUTPUT_MASK = "output_mask"


@dataclass
class BatchPolicy:
    max_batch_size: int = 64
    budget: int = 16384  # padded cost units per batch: text tokens, audio samples, image pixels
    fill: int = 0  # a batch stops growing at this cost (CPU: small tight batches lose nothing); 0: the budget
    max_padding: float = 0.10  # most of a batch's work spent on padding (its longest input sets the width)
    attention_length: int = 0  # cost units at which attention does as much work per position as the rest; 0: none
    length_buckets: int = 0  # batch lengths round up to one of this many per doubling (0: exact lengths)
    max_length: int = 0  # padding never goes beyond this (text: the model's positions); 0: no cap
    max_delay_s: float = 0.002
    sort_window: int = 2048
    max_queue: int = 2048

    @property
    def limit(self) -> float:
        """The most a batch may cost: the fill target within the budget."""
        return min(self.fill, self.budget) if self.fill > 0 else self.budget

    def work(self, length: float) -> float:
        """What one row of `length` cost units computes: per-position work plus attention's length-squared term
        (per layer and position ~12 d^2 + 2 L d multiply-adds, so attention doubles it at L = 6 d)."""
        return length * (1.0 + length / self.attention_length) if self.attention_length > 0 else float(length)

    def cost(self, count: int, longest: int) -> float:
        """What a batch of `count` inputs whose longest has `longest` units computes, bucket padding included."""
        return count * self.work(self.padded(longest))

    def padding(self, count: int, longest: int, useful: float) -> float:
        """The share of a batch's work spent on padding between its inputs, `useful` being the sum of their
        `work`; bucket rounding is left out (it is bounded by 1 / length_buckets on its own)."""
        return 1.0 - useful / (count * self.work(longest)) if longest > 0 else 0.0

    def padded(self, length: int) -> int:
        """The batch length for a longest input of `length`: geometric buckets waste at most 1/length_buckets
        and bound the number of shapes a session sees (what matters on GPUs)."""
        if self.length_buckets <= 0 or length <= 1:
            return length
        step = max(1, (1 << (length.bit_length() - 1)) // self.length_buckets)
        n = -(-length // step) * step
        return min(n, max(self.max_length, length)) if self.max_length else n


@dataclass(eq=False, slots=True)
class Item:
    """One prepared input waiting for the model. `finish` maps its [positions, hidden] output to the result."""

    value: np.ndarray
    length: int  # cost units: tokens, samples or pixels
    output: str  # the graph output it needs
    finish: Callable[[np.ndarray], Any]
    deadline: float | None = None  # time.monotonic() value
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    enqueued: float = 0.0
    work: float = 0.0  # policy.work(length), set when queued
    seq: int = 0  # arrival number, set when queued


@dataclass
class ItemResult:
    value: Any
    positions: int
    queue_s: float
    run_s: float
    batch: BatchRun | None = None  # the model run that computed it (traces)


class Batcher:
    def __init__(self, name: str, modality: str, runner: Runner, policy: BatchPolicy, pad_id: int = 1,
                 on_death: Callable[[str, BaseException], None] | None = None) -> None:
        self.name, self.modality, self.runner, self.policy, self.pad_id = name, modality, runner, policy, pad_id
        self._on_death = on_death
        self._cond = threading.Condition()
        self._queue: list[Item] = []  # arrival order
        self._by_length: list[tuple[int, int, Item]] = []  # the same inputs as (length, seq, item), sorted
        self._arrivals = itertools.count()
        self._queued_cost = 0.0
        self._next_deadline = math.inf  # no queued input expires before this (it may be earlier than the soonest)
        self._cancelled = False  # some queued input's call may have been cancelled since the last sweep
        self._admitted = 0  # reserved slots: inputs being preprocessed or queued
        self._returning = 0  # inputs answered lately whose clients have not come back yet (closed loops do)
        self._free_since = 0.0  # when the session last finished a batch
        self.state = "new"  # new -> warming -> ready -> closing -> closed; or dead
        self.ready = concurrent.futures.Future()  # resolves when warmed up (exception: died before)
        self._thread = threading.Thread(target=self._main, name=f"d2v-run-{name}", daemon=True)
        self._post = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"d2v-post-{name}")
        self._warmup: list[list[np.ndarray]] = []
        metrics.gauge_from(metrics.QUEUE_DEPTH.labels(name), self, lambda b: b._admitted)
        # read when scraped: after a reload the new batcher of a name owns the gauge, whatever the old one does
        metrics.gauge_from(metrics.WORKER_UP.labels(name), self, lambda b: b.state == "ready")

    # ---- called from the event loop -------------------------------------------------------------------------

    def start(self, warmup: Sequence[Sequence[np.ndarray]] = ()) -> concurrent.futures.Future:
        """Start the worker; it runs each warm-up batch (lists of prepared values) before `ready` resolves."""
        self._warmup = [list(b) for b in warmup]
        self.state = "warming"
        self._thread.start()
        return self.ready

    @property
    def alive(self) -> bool:
        return self.state in ("warming", "ready", "closing")

    @property
    def depth(self) -> int:
        return self._admitted

    def reserve(self, n: int) -> None:
        """Admit `n` inputs (before preprocessing them) or raise RESOURCE_EXHAUSTED / UNAVAILABLE."""
        with self._cond:
            if self.state == "dead":
                raise unavailable(f"model {self.name} is down (its worker stopped); the server reports NOT_SERVING")
            if self.state in ("closing", "closed"):
                raise unavailable("server is shutting down")
            if self._admitted + n > self.policy.max_queue:
                raise resource_exhausted(f"model {self.name} queue is full ({self._admitted} of "
                                         f"{self.policy.max_queue} inputs pending); retry with backoff")
            self._admitted += n
            self._returning = max(0, self._returning - n)

    def release(self, n: int) -> None:
        """Give back reservations of inputs that will not be submitted (bad input, cancelled call)."""
        with self._cond:
            self._admitted -= n
            self._cond.notify()

    def submit(self, items: Sequence[Item]) -> None:
        """Queue reserved inputs. Each item's future gets an ItemResult or a ServeError."""
        now = time.monotonic()
        with self._cond:
            if self.state == "dead":
                self._admitted -= len(items)
                raise unavailable(f"model {self.name} is down (its worker stopped)")
            work = self.policy.work
            for item in items:
                item.enqueued = now
                item.seq = next(self._arrivals)
                bisect.insort(self._by_length, (item.length, item.seq, item))
                item.work = work(item.length)
                self._queued_cost += item.work
                if item.deadline is not None and item.deadline < self._next_deadline:
                    self._next_deadline = item.deadline
            self._queue.extend(items)
            self._cond.notify()

    def cancelled(self) -> None:
        """Some queued inputs' call was cancelled (their futures are): the next batch formation drops them."""
        with self._cond:
            self._cancelled = True

    def close(self, timeout: float | None = None) -> None:
        """Finish everything admitted, then stop the worker."""
        with self._cond:
            if self.state in ("warming", "ready", "new"):
                self.state = "closing"
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._post.shutdown(wait=True)

    # ---- the worker thread ----------------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            for values in self._warmup:
                outputs = [o for o in self.runner.output_names if o != OUTPUT_MASK] + [OUTPUT_MASK]
                self._run(values, outputs)
            with self._cond:
                if self.state == "warming":
                    self.state = "ready"
            self.ready.set_result(None)
            while (batch := self._next_batch()) is not None:
                self._process(batch)
            with self._cond:
                self.state = "closed"
        except BaseException as exc:  # noqa: BLE001 - a dead worker must be reported, whatever killed it
            self._die(exc)

    def _die(self, exc: BaseException) -> None:
        log.error("model worker died", extra={"model": self.name, "error": f"{type(exc).__name__}: {exc}"},
                  exc_info=exc)
        with self._cond:
            self.state = "dead"
            queued, self._queue, self._by_length = self._queue, [], []
            self._admitted -= len(queued)
            self._queued_cost = 0.0
            self._next_deadline = math.inf
        for item in queued:
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(unavailable(f"model {self.name} is down (its worker stopped)"))
        if not self.ready.done():
            self.ready.set_exception(exc)
        if self._on_death is not None:
            self._on_death(self.name, exc)

    def _next_batch(self) -> list[Item] | None:
        with self._cond:
            while True:
                now = time.monotonic()
                if self._queue:
                    wait = self._wait_for_more(now)
                    if wait > 0:
                        self._cond.wait(wait)
                        continue
                    self._drop_expired(now)
                    if not self._queue:
                        continue
                    batch = self._select()
                    self._remove(batch, self.policy.sort_window)
                    batch = [it for it in batch if it.future.set_running_or_notify_cancel()]
                    if batch:
                        return batch
                elif self.state == "closing" and self._admitted == 0:
                    return None
                else:
                    self._cond.wait()

    def _wait_for_more(self, now: float) -> float:
        """Seconds to hold the queue for inputs on their way before forming a batch; 0: form it now.

        Inputs are on their way while some are being preprocessed, or while fewer have arrived since the session
        last answered than it answered (closed-loop clients send again on each answer). Waiting is pointless when
        nothing is expected (a lone client, open-loop traffic) or when the queue already holds a full batch, and
        ends `max_delay_s` after the session freed or the oldest input arrived, whichever is later. Counts only:
        it runs on every arrival, so it never sorts the queue.
        """
        p = self.policy
        expected = self._returning + self._admitted - len(self._queue)
        if self.state == "closing" or expected <= 0 or len(self._queue) >= p.max_batch_size:
            return 0.0
        if self._queued_cost + p.work(p.padded(self._queue[0].length)) > p.limit:  # not even one more would fit
            return 0.0
        due = max(self._free_since, self._queue[0].enqueued) + p.max_delay_s
        if now >= due:
            self._returning = 0  # they did not come back within the delay: stop expecting them
            return 0.0
        return due - now

    def _drop_expired(self, now: float) -> None:
        """Drop queued inputs whose call was cancelled (client gone) or whose deadline has passed. The queue is
        swept only when one may have (a cancellation was reported, or the soonest deadline is due): a sweep per
        batch costs as much as the rest of batch formation on a deep queue."""
        if not self._cancelled and now < self._next_deadline:
            return
        dropped = []
        soonest = math.inf
        for item in self._queue:
            if item.future.cancelled():
                dropped.append(item)
                metrics.DROPPED.labels(self.name, "cancelled").inc()
            elif item.deadline is not None and now >= item.deadline:
                dropped.append(item)
                metrics.DROPPED.labels(self.name, "deadline").inc()
                if item.future.set_running_or_notify_cancel():
                    item.future.set_exception(deadline_exceeded(
                        f"deadline passed after {now - item.enqueued:.3f} s in the queue of model {self.name}"))
            elif item.deadline is not None and item.deadline < soonest:
                soonest = item.deadline
        self._cancelled, self._next_deadline = False, soonest
        if dropped:
            self._remove(dropped)

    def _remove(self, items: list[Item], within: int = 0) -> None:
        """Take `items` off the queue; `within`: they are all among its first `within` (the sort window)."""
        gone = {id(it) for it in items}
        if 0 < within < len(self._queue):
            self._queue = [it for it in self._queue[:within] if id(it) not in gone] + self._queue[within:]
        else:
            self._queue = [it for it in self._queue if id(it) not in gone]
        for it in items:
            del self._by_length[bisect.bisect_left(self._by_length, (it.length, it.seq))]
        self._queued_cost = max(0.0, self._queued_cost - sum(it.work for it in items))
        self._admitted -= len(items)

    def _select(self) -> list[Item]:
        """The oldest input plus its nearest neighbours by length among the first `sort_window` queued.

        A neighbour joins while the batch's cost stays within the fill target and budget, its padded share within
        `max_padding`, and its size within `max_batch_size`; of the two neighbours (next shorter, next longer) the
        one that leaves less padding joins first. The queue is kept sorted by length as inputs arrive, so this costs
        in proportion to the batch, not to the window.
        """
        p = self.policy
        index = self._by_length
        oldest = self._queue[0]
        last = self._queue[min(p.sort_window, len(self._queue)) - 1].seq  # the window's newest input

        def shorter(j: int) -> int:  # the next in-window position below j (-1: none)
            j -= 1
            while j >= 0 and index[j][1] > last:
                j -= 1
            return j

        def longer(j: int) -> int:  # the next in-window position above j (len(index): none)
            j += 1
            while j < len(index) and index[j][1] > last:
                j += 1
            return j

        start = bisect.bisect_left(index, (oldest.length, oldest.seq))
        below, above = shorter(start), longer(start)
        longest, useful, count = oldest.length, oldest.work, 1
        while count < p.max_batch_size:
            best: tuple[float, int, int] | None = None  # (padding after, side, new longest)
            for side, j in ((-1, below), (1, above)):
                if not 0 <= j < len(index):
                    continue
                item = index[j][2]
                new_longest = max(longest, item.length)
                padding = p.padding(count + 1, new_longest, useful + item.work)
                if p.cost(count + 1, new_longest) > p.limit or padding > p.max_padding + 1e-12:
                    continue
                if best is None or padding < best[0]:
                    best = (padding, side, new_longest)
            if best is None:
                break
            _, side, longest = best
            if side < 0:
                useful += index[below][2].work
                below = shorter(below)
            else:
                useful += index[above][2].work
                above = longer(above)
            count += 1
        return [entry[2] for entry in index[below + 1: above] if entry[1] <= last]

    def _run(self, values: list[np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        feeds = collate(self.modality, values, pad_id=self.pad_id)
        if self.modality != "image":
            feeds = self._pad(feeds)
        return self.runner.run(feeds, outputs)

    def _pad(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Right-pad the length axis to the policy's bucket (bounded number of shapes)."""
        width = feeds["attention_mask"].shape[1]
        extra = self.policy.padded(width) - width
        if extra <= 0:
            return feeds
        pad_value = {"input_ids": self.pad_id}
        return {k: np.pad(v, ((0, 0), (0, extra)), constant_values=pad_value.get(k, 0)) for k, v in feeds.items()}

    def _process(self, batch: list[Item]) -> None:
        start = time.monotonic()
        outputs = sorted({it.output for it in batch}) + [OUTPUT_MASK]
        try:
            outs = self._run([it.value for it in batch], outputs)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            if len(batch) > 1:
                # Never let one input fail its batch-mates: run each alone, only the culprit fails.
                log.warning("batch run failed, retrying inputs one by one",
                            extra={"model": self.name, "batch_size": len(batch), "error": str(exc)[:300]})
                for item in batch:
                    self._process([item])
                return
            metrics.ERRORS.labels(self.name, "INTERNAL").inc()
            batch[0].future.set_exception(internal(f"model {self.name} failed on this input: "
                                                   f"{' '.join(str(exc).split())[:300]}"))
            return
        done = time.monotonic()
        run_s = done - start
        with self._cond:
            self._returning += len(batch)
            self._free_since = done
        run = self._record(batch, outs, start, run_s)
        self._post.submit(self._deliver, batch, outs, run)

    def _record(self, batch: list[Item], outs: dict[str, np.ndarray], start: float, run_s: float) -> BatchRun:
        mask = outs[OUTPUT_MASK]
        valid = int(np.count_nonzero(mask))
        metrics.child(metrics.BATCH_SIZE, self.name).observe(len(batch))
        metrics.child(metrics.PADDING, self.name).observe(1.0 - valid / max(1, mask.size))
        metrics.child(metrics.POSITIONS, self.name, "valid").inc(valid)
        metrics.child(metrics.POSITIONS, self.name, "padded").inc(mask.size - valid)
        metrics.child(metrics.BUSY_SECONDS, self.name).inc(run_s)
        metrics.child(metrics.STAGE_SECONDS, self.name, "inference").observe(run_s)
        return BatchRun(start, run_s, len(batch), int(mask.size), int(mask.size) - valid)

    def _deliver(self, batch: list[Item], outs: dict[str, np.ndarray], run: BatchRun) -> None:
        """Finish each input from its rows of the batch output: inputs whose `finish` has a `finish_batch`
        (pooling options) are finished together, a group at a time; the others one by one."""
        t0, start = time.monotonic(), run.start
        positions = np.count_nonzero(outs[OUTPUT_MASK], axis=1)  # right-padded: an input's valid rows come first
        groups: dict[tuple[str, Any], list[int]] = {}
        for i, item in enumerate(batch):
            # the same options are one object (the core keeps one per option set): no dataclass hashing per input
            key = (item.output, id(item.finish) if hasattr(item.finish, "finish_batch") else id(item))
            groups.setdefault(key, []).append(i)
        for (output, _), rows in groups.items():
            finish = batch[rows[0]].finish
            try:
                if hasattr(finish, "finish_batch"):
                    hidden = outs[output] if len(rows) == len(batch) else outs[output][rows]
                    values = finish.finish_batch(hidden, positions[rows])
                else:
                    values = [finish(outs[output][rows[0], : positions[rows[0]]])]
            except ServeError as exc:
                for i in rows:
                    batch[i].future.set_exception(exc)
                continue
            except Exception as exc:  # noqa: BLE001 - reported to these inputs' callers only
                log.exception("postprocessing failed", extra={"model": self.name})
                for i in rows:
                    batch[i].future.set_exception(internal(f"postprocessing failed: {exc}"))
                continue
            for i, value in zip(rows, values, strict=True):
                batch[i].future.set_result(ItemResult(value, int(positions[i]), start - batch[i].enqueued,
                                                                run.run_s, run))
        queue_hist = metrics.child(metrics.STAGE_SECONDS, self.name, "queue")
        for item in batch:
            queue_hist.observe(start - item.enqueued)
        metrics.child(metrics.STAGE_SECONDS, self.name, "postprocess").observe(time.monotonic() - t0)
