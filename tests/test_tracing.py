"""Traces: the span structure of a call (the SDK's in-memory exporter), the caller's traceparent, where traces go,
and one end-to-end export over OTLP/HTTP from the real server to a receiver this test starts."""

from __future__ import annotations

import http.server
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is part of the test install")

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from d2v_serve._proto.d2v.v1 import embedder_pb2 as pb  # noqa: E402
from d2v_serve._proto.d2v.v1 import embedder_pb2_grpc as pb_grpc  # noqa: E402
from d2v_serve.cli import DEMO_MODELS  # noqa: E402
from d2v_serve.config import ServerConfig  # noqa: E402
from d2v_serve.core.results import TIMING_HEADERS  # noqa: E402
from d2v_serve.tracing import BatchRun, CallStamps, Tracing, endpoint, tracing_from_config  # noqa: E402

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture
def exported() -> tuple[Tracing, InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    return Tracing(provider), spans


def _stamps() -> CallStamps:
    first = BatchRun(start=100.012, run_s=0.015, size=8, positions=8 * 40, padded=25)
    second = BatchRun(start=100.030, run_s=0.012, size=3, positions=3 * 12, padded=0)
    return CallStamps(start=100.0, admitted=100.001, preprocessed=100.010, end=100.050,
                      batches=[first, first, second])  # two inputs in the first batch, one in the second


def test_one_span_per_call_with_a_child_per_stage_and_batch(exported) -> None:
    tracing, spans = exported
    tracing.record("d2v.v1.Embedder/Embed", "demo-text", _stamps(), inputs=3)
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
    tracing.record("POST /v1/embeddings", "demo-text", _stamps(),
                   {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    root = next(s for s in spans.get_finished_spans() if s.name == "POST /v1/embeddings")
    assert f"{root.context.trace_id:032x}" == TRACE_ID
    assert f"{root.parent.span_id:016x}" == PARENT_ID and root.parent.is_remote


def test_a_failed_call_is_an_error_span_with_the_stages_it_reached(exported) -> None:
    tracing, spans = exported
    tracing.record("d2v.v1.Embedder/Embed", "demo-text", CallStamps(start=5.0, end=5.002),
                   error="INVALID_ARGUMENT")
    names = {s.name: s for s in spans.get_finished_spans()}
    assert set(names) == {"d2v.v1.Embedder/Embed", "admission"}
    root = names["d2v.v1.Embedder/Embed"]
    assert root.status.status_code.name == "ERROR" and root.status.description == "INVALID_ARGUMENT"


def test_off_records_nothing() -> None:
    tracing = Tracing()
    assert not tracing.enabled
    tracing.record("m", "model", CallStamps())  # no provider: nothing to do, nothing raised
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


# ---- end to end: the real d2v-serve exports over OTLP/HTTP; timing headers and trailing metadata ----------------


class _Receiver(http.server.BaseHTTPRequestHandler):
    """A minimal OTLP/HTTP traces receiver: keeps each ExportTraceServiceRequest it is sent."""

    received: list[ExportTraceServiceRequest] = []

    def do_POST(self) -> None:  # noqa: N802 - the http.server handler name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/v1/traces" and self.headers["Content-Type"] == "application/x-protobuf":
            message = ExportTraceServiceRequest()
            message.ParseFromString(body)
            type(self).received.append(message)
            self.send_response(200)
        else:
            self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_server_exports_traces_and_sends_timings(tmp_path: Path) -> None:
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    shutil.copy(DEMO_MODELS / "demo-text.onnx", tmp_path)
    port, http_port = _free_port(), _free_port()
    exe = Path(sys.executable).with_name("d2v-serve")
    proc = subprocess.Popen([str(exe), "--models", str(tmp_path), "--host", "127.0.0.1", "--port", str(port),
                             "--http-port", str(http_port), "--metrics-port", "0",
                             "--otlp-endpoint", f"http://127.0.0.1:{receiver.server_port}",
                             "--otlp-service-name", "d2v-test"], stderr=subprocess.DEVNULL)
    grpc_parent, http_parent = "1" * 16, "2" * 16
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=90)
        stub = pb_grpc.EmbedderStub(channel)
        request = pb.EmbedRequest(model="demo-text", inputs=[pb.Input(text="one"), pb.Input(text="two words")])
        for _ in range(600):
            try:
                traceparent = (("traceparent", f"00-{TRACE_ID}-{grpc_parent}-01"),)
                reply, call = stub.Embed.with_call(request, metadata=traceparent)
                break
            except grpc.RpcError:  # warming up: NOT_SERVING models answer UNAVAILABLE
                time.sleep(0.1)
        trailers = dict(call.trailing_metadata())
        body = json.dumps({"model": "demo-text", "input": ["hello world"]}).encode()
        http_request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/embeddings", data=body, headers={
            "Content-Type": "application/json", "traceparent": f"00-{TRACE_ID}-{http_parent}-01"})
        with urllib.request.urlopen(http_request, timeout=30) as response:
            headers = {k.lower(): v for k, v in response.headers.items()}
            usage = json.loads(response.read())["usage"]
        channel.close()
    finally:
        proc.send_signal(signal.SIGTERM)  # the drain flushes the spans still buffered
        assert proc.wait(timeout=60) == 0
        receiver.shutdown()

    for timings, positions in ((trailers, reply.usage.positions), (headers, usage["total_tokens"])):
        assert set(TIMING_HEADERS.values()) <= set(timings)
        assert int(timings["x-d2v-positions"]) == positions
        total = float(timings["x-d2v-total-ms"])
        parts = [float(timings[f"x-d2v-{stage}-ms"]) for stage in ("preprocess", "queue", "inference")]
        assert total > 0 and all(0 <= p <= total for p in parts)

    spans = [(resource_spans.resource, span) for message in _Receiver.received
             for resource_spans in message.resource_spans for scope in resource_spans.scope_spans
             for span in scope.spans]
    services = {attr.value.string_value for resource, _ in spans for attr in resource.attributes
                if attr.key == "service.name"}
    assert services == {"d2v-test"}
    roots = {span.name: span for _, span in spans if span.name in ("Embed", "/v1/embeddings")}
    assert set(roots) == {"Embed", "/v1/embeddings"}
    for root, parent in ((roots["Embed"], grpc_parent), (roots["/v1/embeddings"], http_parent)):
        assert root.trace_id.hex() == TRACE_ID and root.parent_span_id.hex() == parent
        children = {span.name for _, span in spans if span.parent_span_id == root.span_id}
        assert children == {"admission", "preprocess", "queue", "batch", "postprocess"}
