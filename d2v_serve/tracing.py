"""OpenTelemetry traces of embed calls, exported over OTLP/HTTP (the `otel` extra). Off unless an endpoint is set
(`--otlp-endpoint`, or the standard OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT), and then
opentelemetry is never imported: the request path pays one attribute check.

A call's spans are written when it ends, from the stamps the core took on the way (a batch serves many calls, so
its run is known only once it is over): one span per call, with a child per stage: admission, preprocess, queue,
one `batch` span per model run that carried its inputs (model, batch size, positions, padded positions) and
postprocess. A W3C `traceparent` from HTTP headers or gRPC metadata makes the call span a child of the caller's.
The standard OTEL_* variables (service name, resource attributes, sampler, headers, timeout) apply as usual.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import ServerConfig

_DEFAULT_SERVICE = "d2v-serve"
_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
TRACE_HEADERS = ("traceparent", "tracestate")  # W3C Trace Context: what a transport passes to the core


@dataclass(frozen=True, slots=True)
class BatchRun:
    """One model run (time.monotonic seconds), shared by the results of every input it carried."""

    start: float
    run_s: float
    size: int  # inputs in the batch
    positions: int  # padded batch shape: inputs x longest
    padded: int  # of those, positions that were padding


@dataclass(slots=True)
class CallStamps:
    """time.monotonic() at each step of a call that the core reached; 0 for steps it did not."""

    start: float = field(default_factory=time.monotonic)
    admitted: float = 0.0  # its inputs hold queue room
    preprocessed: float = 0.0  # its inputs are decoded and queued
    end: float = 0.0
    batches: list[BatchRun] = field(default_factory=list)  # the runs that carried its inputs (repeats allowed)


class Tracing:
    """Writes call spans to a TracerProvider; `Tracing()` (no provider) is off and does nothing."""

    def __init__(self, provider: Any = None) -> None:
        self.enabled = provider is not None
        self._provider = provider
        if self.enabled:
            from opentelemetry.propagate import extract
            from opentelemetry.trace import SpanKind, Status, StatusCode

            self._tracer = provider.get_tracer("d2v_serve")
            self._extract, self._kind = extract, SpanKind.SERVER
            self._error = lambda message: Status(StatusCode.ERROR, message)

    def record(self, method: str, model: str, stamps: CallStamps, carrier: Mapping[str, str] | None = None, *,
               inputs: int = 0, error: str = "") -> None:
        """The spans of one finished call. `carrier`: the caller's trace headers; `error`: the status code name of
        a failed call ('' when it succeeded)."""
        if not self.enabled:
            return
        end = stamps.end or time.monotonic()
        to_ns = _wall_clock(end)
        root = self._tracer.start_span(method, context=self._extract(dict(carrier or {})), kind=self._kind,
                                       start_time=to_ns(stamps.start),
                                       attributes={"d2v.model": model, "d2v.inputs": inputs})
        if error:
            root.set_status(self._error(error))
            root.set_attribute("rpc.grpc.status_code_name", error)
        parent = _context_of(root)
        admitted = stamps.admitted or stamps.start
        preprocessed = stamps.preprocessed or admitted
        self._child("admission", parent, to_ns(stamps.start), to_ns(admitted))
        if stamps.preprocessed:
            self._child("preprocess", parent, to_ns(admitted), to_ns(preprocessed))
        runs = sorted({id(b): b for b in stamps.batches}.values(), key=lambda b: b.start)
        if runs:
            self._child("queue", parent, to_ns(preprocessed), to_ns(runs[0].start))
            for run in runs:
                self._child("batch", parent, to_ns(run.start), to_ns(run.start + run.run_s),
                            {"d2v.model": model, "d2v.batch.size": run.size, "d2v.batch.positions": run.positions,
                             "d2v.batch.padded_positions": run.padded})
            last = max(run.start + run.run_s for run in runs)
            self._child("postprocess", parent, to_ns(last), to_ns(end))
        root.end(end_time=to_ns(end))

    def shutdown(self) -> None:
        """Export what is buffered (the drain calls this before the process exits)."""
        if self.enabled:
            self._provider.shutdown()

    def _child(self, name: str, parent: Any, start_ns: int, end_ns: int,
               attributes: dict[str, Any] | None = None) -> None:
        span = self._tracer.start_span(name, context=parent, start_time=start_ns, attributes=attributes)
        span.end(end_time=max(start_ns, end_ns))


def _wall_clock(now_monotonic: float):
    """time.monotonic() seconds -> wall-clock nanoseconds, by one offset read now."""
    offset_ns = time.time_ns() - int(now_monotonic * 1e9)
    return lambda t: offset_ns + int(t * 1e9)


def _context_of(span: Any) -> Any:
    from opentelemetry.trace import set_span_in_context

    return set_span_in_context(span)


def endpoint(config: ServerConfig, environ: Mapping[str, str] = os.environ) -> str:
    """Where traces go: --otlp-endpoint, else the OTEL_* variables; '' when tracing is off."""
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true" or environ.get("OTEL_TRACES_EXPORTER") == "none":
        return ""
    return config.otlp_endpoint or next((environ[v] for v in _ENDPOINT_VARS if environ.get(v)), "")


def tracing_from_config(config: ServerConfig, environ: Mapping[str, str] = os.environ) -> Tracing:
    """Tracing as configured; raises ValueError (one line) when it is asked for and the `otel` extra is missing."""
    url = endpoint(config, environ)
    if not url:
        return Tracing()
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ValueError("tracing (--otlp-endpoint or OTEL_EXPORTER_OTLP_*ENDPOINT) needs the otel extra: "
                         "pip install 'd2v[otel]'") from None
    name = config.otlp_service_name or environ.get("OTEL_SERVICE_NAME") or _DEFAULT_SERVICE
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    if config.otlp_endpoint:  # a collector's base URL, as OTEL_EXPORTER_OTLP_ENDPOINT takes it
        exporter = OTLPSpanExporter(endpoint=_traces_url(config.otlp_endpoint))
    else:  # the exporter reads the OTEL_* variables itself
        exporter = OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(provider)


def _traces_url(base: str) -> str:
    base = base.rstrip("/")
    return base if base.endswith("/v1/traces") else base + "/v1/traces"
