"""Traces: the span structure of a call (the SDK's in-memory exporter), the caller's traceparent, where traces go,
and one end-to-end export over OTLP/HTTP from the real server to a receiver this test starts."""

from __future__ import annotations

import pytest

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is part of the test install")

from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from d2v_serve.config import ServerConfig  # noqa: E402
from d2v_serve.tracing import BatchRun, CallStamps, Tracing, endpoint, tracing_from_config  # noqa: E402

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture
def exported() -> tuple[Tracing, InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    return Tracing(provider), spans


def _stamps() -> tuple[CallStamps, list[BatchRun]]:
    stamps = CallStamps(start=100.0, admitted=100.001, preprocessed=100.010, end=100.050)
    first = BatchRun(start=100.012, run_s=0.015, size=8, positions=8 * 40, padded=25)
    second = BatchRun(start=100.030, run_s=0.012, size=3, positions=3 * 12, padded=0)
    return stamps, [first, first, second]  # two inputs in the first batch, one in the second


def test_one_span_per_call_with_a_child_per_stage_and_batch(exported) -> None:
    tracing, spans = exported
    stamps, batches = _stamps()
    tracing.record("d2v.v1.Embedder/Embed", "demo-text", stamps, batches, inputs=3)
    by_name: dict[str, list] = {}
    for span in spans.get_finished_spans():
        by_name.setdefault(span.name, []).append(span)
    (root,) = by_name.pop("d2v.v1.Embedder/Embed")
    assert root.parent is None and root.attributes["d2v.model"] == "demo-text" and root.attributes["d2v.inputs"] == 3
    assert sorted(by_name) == ["admission", "batch", "postprocess", "preprocess", "queue"]
    children = [s for group in by_name.values() for s in group]
    assert all(s.parent.span_id == root.context.span_id for s in children)
    assert all(s.context.trace_id == root.context.trace_id for s in children)

    def ms(span) -> float:
        return (span.end_time - span.start_time) / 1e6

    assert ms(root) == pytest.approx(50, abs=0.01)
    assert ms(by_name["admission"][0]) == pytest.approx(1, abs=0.01)
    assert ms(by_name["preprocess"][0]) == pytest.approx(9, abs=0.01)
    assert ms(by_name["queue"][0]) == pytest.approx(2, abs=0.01)  # to the first batch's start
    first, second = sorted(by_name["batch"], key=lambda s: s.start_time)  # one span per distinct run
    assert ms(first) == pytest.approx(15, abs=0.01) and ms(second) == pytest.approx(12, abs=0.01)
    assert dict(first.attributes) == {"d2v.model": "demo-text", "d2v.batch.size": 8, "d2v.batch.positions": 320,
                                      "d2v.batch.padded_positions": 25}
    assert ms(by_name["postprocess"][0]) == pytest.approx(8, abs=0.01)  # from the last batch's end
    stages = [by_name[n][0] for n in ("admission", "preprocess", "queue")] + [first, second]
    assert all(a.end_time <= b.start_time + 1000 for a, b in zip(stages, stages[1:], strict=False))


def test_the_callers_traceparent_is_the_parent(exported) -> None:
    tracing, spans = exported
    stamps, batches = _stamps()
    tracing.record("POST /v1/embeddings", "demo-text", stamps, batches,
                   {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    root = next(s for s in spans.get_finished_spans() if s.name == "POST /v1/embeddings")
    assert f"{root.context.trace_id:032x}" == TRACE_ID
    assert f"{root.parent.span_id:016x}" == PARENT_ID and root.parent.is_remote


def test_a_failed_call_is_an_error_span_with_the_stages_it_reached(exported) -> None:
    tracing, spans = exported
    tracing.record("d2v.v1.Embedder/Embed", "demo-text", CallStamps(start=5.0, end=5.002), [],
                   error="INVALID_ARGUMENT")
    names = {s.name: s for s in spans.get_finished_spans()}
    assert set(names) == {"d2v.v1.Embedder/Embed", "admission"}
    root = names["d2v.v1.Embedder/Embed"]
    assert root.status.status_code.name == "ERROR" and root.status.description == "INVALID_ARGUMENT"


def test_off_records_nothing() -> None:
    tracing = Tracing()
    assert not tracing.enabled
    tracing.record("m", "model", CallStamps(), [])  # no provider: nothing to do, nothing raised
    tracing.shutdown()


def test_where_traces_go() -> None:
    cfg = ServerConfig()
    assert endpoint(cfg, {}) == ""  # off by default
    assert endpoint(cfg, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == "http://c:4318"
    assert endpoint(cfg, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4318/v1/traces",
                          "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == "http://t:4318/v1/traces"
    flagged = ServerConfig(otlp_endpoint="http://flag:4318")
    assert endpoint(flagged, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == "http://flag:4318"
    assert endpoint(flagged, {"OTEL_SDK_DISABLED": "true"}) == ""
    assert endpoint(flagged, {"OTEL_TRACES_EXPORTER": "none"}) == ""
    assert not tracing_from_config(cfg, {}).enabled
    on = tracing_from_config(flagged, {})
    assert on.enabled
    on.shutdown()
