"""Step -> value schedules: learning rate (warmup + cosine, or fairseq's tri-stage) and the EMA decay.

Plain functions of the update count, so a resumed run needs nothing but the step to continue exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .config import SCHEDULES, ScheduleConfig


def warmup_cosine(step: int, total: int, peak: float, warmup: int, min_ratio: float = 0.0) -> float:
    """Linear warmup from 0 to `peak` over `warmup` updates, then cosine down to `min_ratio * peak` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = peak * min_ratio
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def tri_stage(step: int, total: int, peak: float, phases: Sequence[float], init_scale: float = 0.01,
              final_scale: float = 0.01) -> float:
    """fairseq's tri-stage: linear warmup from `init_scale * peak`, hold `peak`, exponential decay to
    `final_scale * peak`; `phases` are the three fractions of `total` (e.g. 0.03, 0.90, 0.07)."""
    if len(phases) != 3 or abs(sum(phases) - 1.0) > 1e-6:
        raise ValueError(f"tri-stage phases must be three fractions summing to 1, got {list(phases)}")
    warmup = int(total * phases[0])
    hold = int(total * phases[1])
    decay = max(1, total - warmup - hold)
    if step < warmup:
        return peak * (init_scale + (1.0 - init_scale) * step / warmup)
    if step < warmup + hold:
        return peak
    t = min(step - warmup - hold, decay)
    return peak * math.exp(math.log(final_scale) * t / decay)


def learning_rate(step: int, total: int, peak: float, schedule: ScheduleConfig) -> float:
    """The lr for update `step` (0-based) of a `total`-update run peaking at `peak`."""
    name = schedule.name
    if name == "cosine":
        warmup = schedule.warmup_steps if schedule.warmup_steps is not None else round(schedule.warmup_frac * total)
        return warmup_cosine(step, total, peak, int(warmup), schedule.min_lr_ratio)
    if name == "tri_stage":
        return tri_stage(step, total, peak, schedule.tri_stage, schedule.init_lr_scale, schedule.final_lr_scale)
    if name == "constant":
        return peak
    raise ValueError(f"unknown lr schedule {name!r}; expected one of {', '.join(SCHEDULES)}")


def ema_decay(updates: int, start: float, end: float, anneal_steps: int) -> float:
    """tau(t) = tau_e - (tau_e - tau_0) * (1 - t / T) for t < T, then tau_e (data2vec / fairseq)."""
    if anneal_steps <= 0 or updates >= anneal_steps:
        return end
    return end - (end - start) * (1.0 - updates / anneal_steps)
