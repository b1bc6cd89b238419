"""Every Prometheus metric the server exports, declared here and nowhere else."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
_FRACTION_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

REQUESTS = Counter("d2v_requests_total", "Embed calls and EmbedStream messages handled, by final status code",
                   ["method", "code"])
ERRORS = Counter("d2v_errors_total", "Failed requests by gRPC status code and model", ["model", "code"])
INPUTS = Counter("d2v_inputs_total", "Inputs embedded", ["model"])
QUEUE_DEPTH = Gauge("d2v_queue_depth", "Inputs admitted and not yet in a batch (preprocessing or queued)", ["model"])
PREPROCESS_BYTES = Gauge("d2v_preprocess_bytes", "Bytes of encoded input being preprocessed (bounded by "
                         "--max-preprocess-mb)")
INFLIGHT = Gauge("d2v_inflight_requests", "Embed calls and stream messages being handled")
BATCH_SIZE = Histogram("d2v_batch_size", "Inputs per model run", ["model"], buckets=_BATCH_BUCKETS)
PADDING = Histogram("d2v_batch_padding_fraction", "Padded share of the positions of a batch", ["model"],
                    buckets=_FRACTION_BUCKETS)
POSITIONS = Counter("d2v_batch_positions_total", "Output positions computed (tokens, audio frames, patches), by "
                    "kind: valid or padded; padded / (valid + padded) is the padded fraction of any window",
                    ["model", "kind"])
BUSY_SECONDS = Counter("d2v_session_busy_seconds_total", "Seconds the model's session spent running batches; its "
                       "rate is the session's busy fraction", ["model"])
STAGE_SECONDS = Histogram("d2v_stage_seconds", "Time per stage: preprocess (per request), queue (per input), "
                          "inference (per batch), postprocess (per batch), total (per request)",
                          ["model", "stage"], buckets=_LATENCY_BUCKETS)
DROPPED = Counter("d2v_dropped_inputs_total", "Inputs dropped at dequeue", ["model", "reason"])
MODEL_RELOADS = Counter("d2v_model_reloads_total", "Model files handled by reloads (SIGHUP, --watch-models), by "
                        "result: loaded (new), replaced, unloaded, failed (the old version keeps serving)",
                        ["result"])
WORKER_UP = Gauge("d2v_worker_up", "1 while a model's worker is warmed up and alive", ["model"])


@functools.cache
def child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, looked up once: the per-request path skips prometheus_client's lock and checks.
    Only for bounded label values (model names, methods, stages, status codes)."""
    return metric.labels(*labels)


def gauge_from(gauge: Any, owner: object, read: Callable[[Any], float]) -> None:
    """The gauge reads `read(owner)` when scraped, instead of being set on every change (the request path updates
    several per call); it reads 0 once `owner` is gone. The latest owner of a gauge wins."""
    ref = weakref.ref(owner)

    def value() -> float:
        alive = ref()
        return float(read(alive)) if alive is not None else 0.0

    gauge.set_function(value)


def serve_metrics(port: int, host: str) -> None:
    """Expose /metrics over HTTP on `host`:`port` (a daemon thread); `host` as --host takes it ("[::]", "0.0.0.0",
    "127.0.0.1", a name)."""
    start_http_server(port, addr=host.strip("[]") or "0.0.0.0")
