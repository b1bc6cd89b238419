"""The arithmetic of a load run: rates between batch edges, latency percentiles, Prometheus histogram deltas."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 99)) -> dict[str, float]:
    """{'p50': ..., 'p99': ...} of `values` (linear interpolation between ranks); NaN when empty."""
    if len(values) == 0:
        return {f"p{q:g}": float("nan") for q in qs}
    points = np.percentile(np.asarray(values, dtype=np.float64), qs)
    return {f"p{q:g}": float(v) for q, v in zip(qs, points, strict=True)}


def edge_rate(ends: Sequence[float], start: float, stop: float, burst_gap: float = 0.25) -> tuple[float, int, float]:
    """(items/s, items counted, seconds) from completion times, counting whole batches only.

    A server answers a batch's items at nearly the same moment, so a rate over a fixed window is off by up to a
    batch at each end. Here the window runs from the first batch end in [start, stop] to the last one, and counts
    the completions after the first up to the last. A batch end is a completion followed by a gap of at least
    `burst_gap` x the largest gap in the window (or by nothing). Evenly spread completions lose nothing either.
    """
    t = np.sort(np.asarray(ends, dtype=np.float64))
    inside = np.flatnonzero((t >= start) & (t <= stop))
    if len(inside) < 3:
        seconds = stop - start
        return (len(inside) / seconds if seconds > 0 else 0.0), len(inside), seconds
    gaps = np.append(np.diff(t), np.inf)  # the gap after each completion; the last one ends its batch
    largest = gaps[inside[:-1]].max()
    ends_of_batches = inside[gaps[inside] >= burst_gap * largest]
    first, last = int(ends_of_batches[0]), int(ends_of_batches[-1])
    if last <= first:
        seconds = stop - start
        return len(inside) / seconds, len(inside), seconds
    seconds = float(t[last] - t[first])
    return (last - first) / seconds, last - first, seconds


@dataclass
class Histogram:
    """A Prometheus histogram's cumulative buckets (upper bound -> count), sum and count."""
    buckets: dict[float, float]
    total: float = 0.0
    count: float = 0.0

    def __sub__(self, earlier: Histogram) -> Histogram:
        return Histogram({b: c - earlier.buckets.get(b, 0.0) for b, c in self.buckets.items()},
                         self.total - earlier.total, self.count - earlier.count)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")

    def counts(self) -> dict[str, int]:
        """Observations per bucket, not cumulative: {'<=1': n, '<=2': n, ..., '>256': n}; empty buckets left out."""
        out: dict[str, int] = {}
        below = 0.0
        for bound in sorted(self.buckets):
            n = self.buckets[bound] - below
            below = self.buckets[bound]
            if n > 0:
                label = f">{max(b for b in self.buckets if b < bound):g}" if bound == float("inf") else f"<={bound:g}"
                out[label] = int(round(n))
        return out


def histograms(text: str, name: str) -> dict[str, Histogram]:
    """The histogram `name` of a /metrics page, by its `model` label."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, Histogram] = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            model = sample.labels.get("model", "")
            h = out.setdefault(model, Histogram({}))
            if sample.name.endswith("_bucket"):
                h.buckets[float(sample.labels["le"])] = sample.value
            elif sample.name.endswith("_sum"):
                h.total = sample.value
            elif sample.name.endswith("_count"):
                h.count = sample.value
    return out


def counters(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The counter `name` (without _total) of a /metrics page, by its sorted label pairs."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == name:
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def gauges(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The gauge `name` of a /metrics page, by its sorted label pairs."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == name:
            for sample in family.samples:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b rounded to 2 places; None when either is missing or b is 0."""
    if a is None or b is None or not b or a != a or b != b:
        return None
    return round(a / b, 2)
