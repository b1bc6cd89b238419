"""The server over real gRPC on loopback: parity with the model file and the torch model, batch invariance, errors,
health, reflection, metrics, auth and a SIGTERM drain of the real `d2v-serve` process."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from d2v_serve._proto.d2v.v1 import embedder_pb2 as pb
from d2v_serve._proto.d2v.v1 import embedder_pb2_grpc as pb_grpc
from d2v_serve._proto.grpc.reflection.v1 import reflection_pb2 as v1_pb2
from d2v_serve._proto.grpc.reflection.v1 import reflection_pb2_grpc as v1_pb2_grpc
from d2v_serve.client import Client, EmbedError, Pcm
from d2v_serve.preprocess import collate, decode_audio, decode_image, min_audio_samples
from tests.serve_fixtures import (
    ServerThread,
    TinyModel,
    encode_audio,
    encode_image,
    hold_batchers,
    make_tiny_model,
    picture,
    self_signed,
    tone,
)

Code = grpc.StatusCode
HIDDEN = 64  # the tiny presets
IMAGE_POSITIONS = 1 + (64 // 8) ** 2  # CLS + patches of the tiny image preset
TEXTS = ["hello world", "the quick brown fox jumps over the lazy dog", "zebras", "a server batches requests",
         "data2vec data2vec", "numbers 0123456789 and punctuation !?.,;:"]


# ---- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyModel]:
    directory = tmp_path_factory.mktemp("models")
    out = {m: make_tiny_model(m, directory) for m in ("audio", "image", "text")}
    out["text-int8"] = make_tiny_model("text", directory, precision="int8")
    assert all(m.meta.hidden_size == HIDDEN for m in out.values())
    return out


@pytest.fixture(scope="module")
def server(models: dict[str, TinyModel]) -> Iterator[ServerThread]:
    # length buckets (a GPU default) on CPU too: batches pad beyond their longest input, results must not move
    with ServerThread(models["text"].path.parent, length_buckets=4) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[Client]:
    with Client(server.target) as c:
        yield c


@pytest.fixture
def text_only(models: dict[str, TinyModel], tmp_path: Path) -> Path:
    """A directory with just the text model (for servers with special settings)."""
    (tmp_path / "text.onnx").symlink_to(models["text"].path)
    return tmp_path


_sessions: dict[Path, ort.InferenceSession] = {}


def direct(model: TinyModel, value: np.ndarray, with_torch: bool = True) -> dict[str, np.ndarray]:
    """The model file run directly by onnxruntime on one prepared input, and the torch model on the same feeds;
    returns the valid positions of each output, keys `onnx:<output>` and `torch:<output>`."""
    if model.path not in _sessions:
        _sessions[model.path] = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    feeds = collate(model.modality, [value], pad_id=getattr(model.preprocessing, "pad_id", 1))
    names = ["last_hidden_state", "target_hidden_state", "output_mask"]
    onnx_out = dict(zip(names, _sessions[model.path].run(names, feeds), strict=True))
    valid = onnx_out["output_mask"][0].astype(bool)
    result = {f"onnx:{name}": onnx_out[name][0][valid] for name in names[:2]}
    if with_torch:
        torch_out = model.torch_outputs(feeds)
        np.testing.assert_array_equal(valid, torch_out["output_mask"][0].astype(bool))
        result.update({f"torch:{name}": torch_out[name][0][valid] for name in names[:2]})
    return result


def prepared(model: TinyModel, raw: object) -> np.ndarray:
    """What the server feeds the model for `raw`, computed here with the shared preprocessing."""
    pre = model.preprocessing
    if model.modality == "text":
        return pre.prepare(raw)
    if model.modality == "image":
        return pre.prepare(decode_image(raw))
    if isinstance(raw, Pcm):
        return pre.prepare(np.asarray(raw.samples, np.float32) / (32768.0 if raw.samples.dtype == np.int16 else 1),
                           raw.sample_rate)
    return pre.prepare(*decode_audio(raw))


def assert_matches(model: TinyModel, raw: object, served: np.ndarray, output: str = "last_hidden_state") -> None:
    """Served per-position output == the model file (1e-5) == the torch model (1e-4)."""
    ref = direct(model, prepared(model, raw))
    assert served.shape == ref[f"onnx:{output}"].shape
    np.testing.assert_allclose(served, ref[f"onnx:{output}"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(served, ref[f"torch:{output}"], atol=1e-4, rtol=0)


def rpc_error(fn: object, *args: object, **kwargs: object) -> EmbedError:
    with pytest.raises(EmbedError) as info:
        fn(*args, **kwargs)
    return info.value


def counter(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- parity: served == model file == torch, per modality --------------------------------------------------


def test_text_matches_model_file_and_torch(client: Client, models: dict[str, TinyModel]) -> None:
    served = client.embed(TEXTS, "text", pooling="none")
    for text, out in zip(TEXTS, served, strict=True):
        assert_matches(models["text"], text, out)
    target = client.embed(TEXTS[1], "text", pooling="none", representation="target")
    assert_matches(models["text"], TEXTS[1], target, "target_hidden_state")


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG"])
def test_audio_files_match_model_file_and_torch(client: Client, models: dict[str, TinyModel], fmt: str) -> None:
    data = encode_audio(tone(0.7, 22050), 22050, fmt)  # resampled to 16 kHz by the server
    assert_matches(models["audio"], data, client.embed(data, "audio", pooling="none"))


def test_pcm_float32_and_int16_match(client: Client, models: dict[str, TinyModel]) -> None:
    wave = tone(0.5, 8000, freq=300)
    for samples in (wave, (wave * 32767).astype(np.int16)):
        pcm = Pcm(samples, 8000)
        assert_matches(models["audio"], pcm, client.embed(pcm, "audio", pooling="none"))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_images_match_model_file_and_torch(client: Client, models: dict[str, TinyModel], fmt: str) -> None:
    data = encode_image(picture(48, 40, seed=3), fmt)
    served = client.embed(data, "image", pooling="none", representation="target")
    assert_matches(models["image"], data, served, "target_hidden_state")


def test_pooling_normalize_dtype(client: Client, models: dict[str, TinyModel]) -> None:
    text = TEXTS[3]
    ref = direct(models["text"], prepared(models["text"], text))["onnx:last_hidden_state"]
    mean = client.embed(text, "text")
    np.testing.assert_allclose(mean, ref.mean(0), atol=1e-5)
    np.testing.assert_allclose(client.embed(text, "text", pooling="cls"), ref[0], atol=1e-5)
    unit = client.embed(text, "text", normalize=True)
    np.testing.assert_allclose(unit, ref.mean(0) / np.linalg.norm(ref.mean(0)), atol=1e-5)
    half = client.embed(text, "text", dtype="float16", pooling="none", normalize=True)
    assert half.dtype == np.float16 and half.shape == ref.shape
    np.testing.assert_allclose(np.linalg.norm(half.astype(np.float32), axis=1), 1.0, atol=2e-3)


def test_usage_timings_and_data_uri(client: Client, models: dict[str, TinyModel]) -> None:
    import base64

    png = encode_image(picture(20, 20), "PNG")
    uri = b"data:image/png;base64," + base64.b64encode(png)
    request = pb.EmbedRequest(model="image", inputs=[pb.Input(image=png), pb.Input(image=uri)], request_id="r1")
    response = client.embed_request(request)
    a, b = (np.frombuffer(e.tensor.data, "<f4") for e in response.embeddings)
    np.testing.assert_array_equal(a, b)
    assert response.request_id == "r1" and response.model == "image"
    assert response.usage.images == 2 and response.usage.positions == 2 * IMAGE_POSITIONS
    t = response.timings
    assert t.total_ms >= t.preprocess_ms > 0 and t.inference_ms > 0 and t.queue_ms >= 0
    wav = encode_audio(tone(1.0), 16000, "WAV")
    usage = client.embed_request(pb.EmbedRequest(model="audio", inputs=[pb.Input(audio=wav)])).usage
    assert usage.audio_frames == 49 and abs(usage.audio_seconds - 1.0) < 1e-6
    usage = client.embed_request(pb.EmbedRequest(model="text", inputs=[pb.Input(text="hello world")])).usage
    assert usage.tokens == usage.positions == len(models["text"].preprocessing.prepare("hello world"))


def test_list_and_describe_models(client: Client) -> None:
    names = {m["name"]: m for m in client.list_models()}
    assert set(names) == {"audio", "image", "text", "text-int8"}
    text = client.describe_model("text")
    assert text["modality"] == "text" and text["hidden_size"] == HIDDEN and text["max_tokens"] == 64
    assert text["representations"] == ["last", "target"] and text["ready"]
    assert text["execution_provider"] == "CPUExecutionProvider"
    assert "tokenizer" not in text["metadata"]["preprocessing"]
    assert names["audio"]["sample_rate"] == 16000 and names["image"]["image_size"] == 64
    assert names["text-int8"]["precision"] == "int8"


def test_embed_stream_keeps_order(client: Client, models: dict[str, TinyModel]) -> None:
    texts = [TEXTS[i % len(TEXTS)] + f" {i}" for i in range(40)]
    streamed = list(client.embed_stream(texts, "text", batch_size=3))
    unary = client.embed(texts, "text")
    assert len(streamed) == 40
    for s, u in zip(streamed, unary, strict=True):
        np.testing.assert_allclose(s, u, atol=1e-5)


def test_stream_window_bounds_in_flight_requests(text_only: Path) -> None:
    with ServerThread(text_only, stream_window=2) as srv, Client(srv.target) as c:
        texts = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(20)]
        streamed = list(c.embed_stream(texts, "text", batch_size=1))
        for s, u in zip(streamed, c.embed(texts, "text"), strict=True):
            np.testing.assert_allclose(s, u, atol=1e-5)


def test_stream_reports_bad_request_in_band(server: ServerThread) -> None:
    channel = grpc.insecure_channel(server.target)
    stub = pb_grpc.EmbedderStub(channel)
    requests = [pb.EmbedRequest(model="text", inputs=[pb.Input(text="fine")], request_id="0"),
                pb.EmbedRequest(model="text", inputs=[pb.Input(text="ok"), pb.Input(text="")], request_id="1"),
                pb.EmbedRequest(model="nope", inputs=[pb.Input(text="x")], request_id="2"),
                pb.EmbedRequest(model="text", inputs=[pb.Input(text="after")], request_id="3")]
    responses = list(stub.EmbedStream(iter(requests), timeout=30))
    channel.close()
    assert [r.request_id for r in responses] == ["0", "1", "2", "3"]
    assert len(responses[0].embeddings) == 1 and len(responses[3].embeddings) == 1
    assert responses[1].error.code == Code.INVALID_ARGUMENT.value[0] and responses[1].error.input_index == 1
    assert responses[2].error.code == Code.NOT_FOUND.value[0] and not responses[2].embeddings


# ---- batching must not change results ----------------------------------------------------------------------


def test_batch_invariance_under_concurrent_mixed_lengths(client: Client, models: dict[str, TinyModel]) -> None:
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over lazy dog data2vec speech images text".split()
    texts = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(1, 13, size=48)]
    clips = [encode_audio(tone(float(s), seed=i), 16000, "WAV") for i, s in enumerate(rng.uniform(0.2, 2.5, 16))]
    before = counter("d2v_batch_size_count", {"model": "text"}), counter("d2v_batch_size_sum", {"model": "text"})

    def one(kind: str, i: int) -> tuple[str, int, np.ndarray]:
        if kind == "text":
            return kind, i, client.embed(texts[i], "text", pooling="none")
        return kind, i, client.embed(clips[i], "audio", pooling="none")

    jobs = [("text", i) for i in range(len(texts))] + [("audio", i) for i in range(len(clips))]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda job: one(*job), jobs))
    for kind, i, out in results:
        ref = direct(models[kind], prepared(models[kind], texts[i] if kind == "text" else clips[i]), with_torch=False)
        np.testing.assert_allclose(out, ref["onnx:last_hidden_state"], atol=1e-5, rtol=0)
    batches = counter("d2v_batch_size_count", {"model": "text"}) - before[0]
    inputs = counter("d2v_batch_size_sum", {"model": "text"}) - before[1]
    assert inputs == len(texts) and batches < len(texts), "concurrent requests were never batched together"

    # one request carrying every length at once: a single cost-bounded batch (or a few)
    together = client.embed(texts, "text", pooling="none")
    for text, out in zip(texts, together, strict=True):
        ref = direct(models["text"], prepared(models["text"], text), with_torch=False)
        np.testing.assert_allclose(out, ref["onnx:last_hidden_state"], atol=1e-5, rtol=0)


def test_int8_batched_close_to_alone(client: Client) -> None:
    """int8 (dynamic quantization) scales activations per batch: batched results are close, not exact."""
    alone = [client.embed(t, "text-int8") for t in TEXTS]
    batched = client.embed(TEXTS, "text-int8")
    for a, b in zip(alone, batched, strict=True):
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) >= 0.999


# ---- errors -------------------------------------------------------------------------------------------------


def test_invalid_argument_names_the_bad_input(client: Client) -> None:
    err = rpc_error(client.embed, [encode_audio(tone(0.3), 16000, "WAV"), b"RIFF\x00\x00\x00\x00WAVEjunk"], "audio")
    assert err.code == Code.INVALID_ARGUMENT and err.input_index == 1 and err.message.startswith("input 1: ")
    assert "\n" not in err.message
    err = rpc_error(client.embed, ["fine", ""], "text")
    assert err.code == Code.INVALID_ARGUMENT and err.input_index == 1 and "empty" in err.message
    err = rpc_error(client.embed_request, pb.EmbedRequest(model="image", inputs=[pb.Input(image=b"\x89PNG broken")]))
    assert err.code == Code.INVALID_ARGUMENT and err.input_index == 0
    err = rpc_error(client.embed_request, pb.EmbedRequest(model="text", inputs=[pb.Input()]))
    assert err.code == Code.INVALID_ARGUMENT and "empty input" in err.message
    err = rpc_error(client.embed_request, pb.EmbedRequest(model="text"))
    assert err.code == Code.INVALID_ARGUMENT and "no inputs" in err.message
    bad_pcm = pb.Input(pcm=pb.Pcm(data=b"\x00" * 7, encoding=pb.Pcm.ENCODING_INT16, sample_rate=16000))
    err = rpc_error(client.embed_request, pb.EmbedRequest(model="audio", inputs=[bad_pcm]))
    assert err.code == Code.INVALID_ARGUMENT
    err = rpc_error(client.embed_request, pb.EmbedRequest(inputs=[pb.Input(text="which text model?")]))
    assert err.code == Code.INVALID_ARGUMENT and "several text models" in err.message


def test_audio_shorter_than_one_frame_is_invalid(server: ServerThread, client: Client) -> None:
    shortest = server.server.models["audio"].min_samples
    assert shortest == min_audio_samples(server.server.models["audio"].meta.conv_layers) > 1
    err = rpc_error(client.embed, [Pcm(tone(1.0), 16000), Pcm(tone(1.0)[: shortest - 1], 16000)], "audio")
    assert err.code == Code.INVALID_ARGUMENT and err.input_index == 1 and f"at least {shortest}" in err.message
    assert client.embed(Pcm(tone(1.0)[:shortest], 16000), "audio", pooling="none").shape == (1, HIDDEN)


def test_too_long_fails_unless_truncated(client: Client) -> None:
    long_text = "word " * 200
    err = rpc_error(client.embed, long_text, "text")
    assert err.code == Code.INVALID_ARGUMENT and "64" in err.message and "truncate" in err.message
    request = pb.EmbedRequest(model="text", inputs=[pb.Input(text=long_text)],
                              options=pb.EmbedOptions(truncate=True, pooling=pb.POOLING_NONE))
    embedding = client.embed_request(request).embeddings[0]
    assert embedding.truncated and embedding.positions == 64


def test_not_found_and_failed_precondition(client: Client) -> None:
    err = rpc_error(client.embed, "hi", "no-such-model")
    assert err.code == Code.NOT_FOUND and "no-such-model" in err.message
    assert rpc_error(client.describe_model, "no-such-model").code == Code.NOT_FOUND
    err = rpc_error(client.embed, [encode_audio(tone(0.3), 16000, "WAV"), "text for audio"], "audio")
    assert err.code == Code.FAILED_PRECONDITION and err.input_index == 1 and "takes audio" in err.message


def _slow_runner(srv: ServerThread, model: str, seconds: float) -> list[int]:
    """Make a model's runs take `seconds`; returns the list of batch sizes it ran."""
    runner = srv.server.models[model].runner
    original, sizes = runner.run, []

    def run(feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        sizes.append(next(iter(feeds.values())).shape[0])
        time.sleep(seconds)
        return original(feeds, outputs)

    runner.run = run
    return sizes


def test_queue_full_and_deadline(text_only: Path) -> None:
    with ServerThread(text_only, max_queue=4, max_request_inputs=4) as srv, Client(srv.target) as c:
        sizes = _slow_runner(srv, "text", 0.6)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            first = pool.submit(c.embed, ["a", "b", "c"], "text")
            time.sleep(0.2)  # the first request is running now
            queued = pool.submit(c.embed, ["d", "e", "f", "g"], "text")  # fills the queue
            time.sleep(0.1)
            err = rpc_error(c.embed, ["h"], "text")
            assert err.code == Code.RESOURCE_EXHAUSTED and "queue is full" in err.message
            assert len(first.result()) == 3 and len(queued.result()) == 4
        dropped = counter("d2v_dropped_inputs_total", {"model": "text", "reason": "cancelled"}) + counter(
            "d2v_dropped_inputs_total", {"model": "text", "reason": "deadline"})
        runs = len(sizes)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            busy = pool.submit(c.embed, "keeps the model busy", "text")
            time.sleep(0.1)
            err = rpc_error(c.embed, "too late", "text", timeout=0.2)
            assert err.code == Code.DEADLINE_EXCEEDED
            busy.result()
        time.sleep(0.1)
        assert len(sizes) == runs + 1, "an input whose deadline had passed was computed"
        assert counter("d2v_dropped_inputs_total", {"model": "text", "reason": "cancelled"}) + counter(
            "d2v_dropped_inputs_total", {"model": "text", "reason": "deadline"}) == dropped + 1


def test_bad_item_at_runtime_does_not_fail_its_batch(text_only: Path) -> None:
    """A batch whose run fails is retried input by input: only the input that fails alone gets INTERNAL."""
    with ServerThread(text_only, max_delay_ms=300) as srv, Client(srv.target) as c:
        runner = srv.server.models["text"].runner
        original = runner.run
        poison = int(srv.server.models["text"].preprocessing.prepare("poison pill").size)

        def run(feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
            if (feeds["attention_mask"].sum(1) == poison).any():
                raise RuntimeError("kernel failure\non two lines")
            return original(feeds, outputs)

        runner.run = run
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            good = [pool.submit(c.embed, t, "text") for t in ("fine one", "another good one here")]
            bad = pool.submit(c.embed, "poison pill", "text")
            for f in good:
                assert f.result().shape == (HIDDEN,)
            with pytest.raises(EmbedError) as info:
                bad.result()
        assert info.value.code == Code.INTERNAL and "\n" not in info.value.message
        assert srv.server.models["text"].batcher.alive


def test_unavailable_while_draining(text_only: Path) -> None:
    with ServerThread(text_only) as srv, Client(srv.target) as c:
        assert c.embed("before", "text").shape == (HIDDEN,)
        srv.server.core.drain.begin()
        err = rpc_error(c.embed, "after", "text")
        assert err.code == Code.UNAVAILABLE and "shutting down" in err.message


def test_bearer_token_auth(text_only: Path) -> None:
    with ServerThread(text_only, auth_token="s3cret") as srv:
        with Client(srv.target) as anonymous:
            assert rpc_error(anonymous.embed, "hi", "text").code == Code.UNAUTHENTICATED
            assert rpc_error(anonymous.list_models).code == Code.UNAUTHENTICATED
            assert anonymous.health() == "SERVING"  # exempt
            assert "d2v.v1.Embedder" in _reflected_services(srv.target)  # exempt
        with Client(srv.target, token="wrong") as wrong:
            assert rpc_error(wrong.embed, "hi", "text").code == Code.UNAUTHENTICATED
        with Client(srv.target, token="s3cret") as ok:
            assert ok.embed("hi", "text").shape == (HIDDEN,)
            assert len(list(ok.embed_stream(["a", "b"], "text"))) == 2


# ---- operability --------------------------------------------------------------------------------------------


def _reflected_services(target: str) -> list[str]:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = list(db.get_services())
        db.FindFileContainingSymbol("d2v.v1.EmbedRequest")  # the descriptors are served too
        return services


def test_reflection_lists_the_service(server: ServerThread) -> None:
    services = _reflected_services(server.target)
    assert {"d2v.v1.Embedder", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= set(services)


def _reflect_v1(channel: grpc.Channel,
                *requests: v1_pb2.ServerReflectionRequest) -> list[v1_pb2.ServerReflectionResponse]:
    return list(v1_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter(requests), timeout=10))


def test_reflection_v1_alone_builds_a_working_request(server: ServerThread) -> None:
    """As grpcurl does: list over v1, fetch the descriptors over v1, build the request from them (no d2v stubs)."""
    with grpc.insecure_channel(server.target) as channel:
        listed, files = _reflect_v1(channel, v1_pb2.ServerReflectionRequest(list_services=""),
                                    v1_pb2.ServerReflectionRequest(file_containing_symbol="d2v.v1.Embedder"))
        assert {s.name for s in listed.list_services_response.service} >= {
            "d2v.v1.Embedder", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}
        pool = descriptor_pool.DescriptorPool()
        pending = [descriptor_pb2.FileDescriptorProto.FromString(b)
                   for b in files.file_descriptor_response.file_descriptor_proto]
        while pending:  # dependencies first
            ready = [f for f in pending if all(_in_pool(pool, d) for d in f.dependency)]
            assert ready, f"unresolvable imports: {[f.name for f in pending]}"
            for f in ready:
                pool.Add(f)
                pending.remove(f)
        method = pool.FindServiceByName("d2v.v1.Embedder").methods_by_name["Embed"]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        request = request_class(model="text")
        request.inputs.add().text = "reflected"
        embed = channel.unary_unary(f"/{method.containing_service.full_name}/{method.name}",
                                    request_serializer=request_class.SerializeToString,
                                    response_deserializer=response_class.FromString)
        response = embed(request, timeout=30)
        tensor = response.embeddings[0].tensor
        assert list(tensor.shape) == [HIDDEN] and len(tensor.data) == 4 * HIDDEN

        # the v1 service describes itself, and errors come back as v1 error responses
        own, missing = _reflect_v1(
            channel, v1_pb2.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
            v1_pb2.ServerReflectionRequest(file_containing_symbol="d2v.v1.NoSuchThing"))
        own_file = descriptor_pb2.FileDescriptorProto.FromString(own.file_descriptor_response.file_descriptor_proto[0])
        assert own_file.package == "grpc.reflection.v1"
        assert missing.error_response.error_code == Code.NOT_FOUND.value[0]


def _in_pool(pool: descriptor_pool.DescriptorPool, name: str) -> bool:
    try:
        pool.FindFileByName(name)
    except KeyError:
        return False
    return True


def _health(target: str, service: str = "") -> str:
    with grpc.insecure_channel(target) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                            timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def test_health_warming_serving_dead_and_stopped(text_only: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = hold_batchers(monkeypatch)
    port = _free_port()
    srv = ServerThread(text_only, port=port)
    srv._thread.start()
    starting = asyncio_submit(srv, srv.server.start())
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:  # the port opens before warm-up ends
        try:
            status = _health(target)
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    names = ["", "d2v.v1.Embedder", "d2v.v1.Embedder/text"]
    assert status == "NOT_SERVING" and all(_health(target, n) == "NOT_SERVING" for n in names)
    with Client(target) as c:
        err = rpc_error(c.embed, "too early", "text")
        assert err.code == Code.UNAVAILABLE and "warming up" in err.message
        release.set()
        starting.result(30)
        assert all(_health(target, n) == "SERVING" for n in names)
        assert c.embed("now", "text").shape == (HIDDEN,)

        # a worker that dies takes the server's health down with it
        def broken(*_args: object) -> list:
            raise MemoryError("simulated worker crash")

        srv.server.models["text"].batcher._select = broken
        err = rpc_error(c.embed, "kills the worker", "text")
        assert err.code == Code.UNAVAILABLE
        deadline = time.monotonic() + 10
        while _health(target) != "NOT_SERVING":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert all(_health(target, n) == "NOT_SERVING" for n in names)
        err = rpc_error(c.embed, "after death", "text")
        assert err.code == Code.UNAVAILABLE and "down" in err.message
        assert not c.describe_model("text")["ready"]
    srv.stop()


def asyncio_submit(srv: ServerThread, coro: object) -> concurrent.futures.Future:
    import asyncio

    return asyncio.run_coroutine_threadsafe(coro, srv.loop)


def test_failed_warmup_stops_the_start_with_a_reason(text_only: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from d2v_serve.backend.runner import Runner

    def broken(self: Runner, feeds: dict, outputs: list) -> dict:
        raise Exception("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : kernel\nfailed")  # ORT's own base class

    monkeypatch.setattr(Runner, "run", broken)
    srv = ServerThread(text_only)
    with pytest.raises(RuntimeError, match="model text failed its warm-up: .*RUNTIME_EXCEPTION") as info:
        srv.__enter__()
    assert "\n" not in str(info.value)
    srv.stop()


def test_metrics_endpoint(text_only: Path) -> None:
    port = _free_port()
    with ServerThread(text_only, metrics_port=port) as srv, Client(srv.target) as c:
        c.embed(["one", "two two"], "text")
        rpc_error(c.embed, "x", "missing")
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for name in ("d2v_queue_depth", "d2v_batch_size_bucket", "d2v_batch_padding_fraction_bucket",
                 "d2v_stage_seconds_bucket", "d2v_requests_total", "d2v_errors_total", "d2v_worker_up"):
        assert name in body, name
    assert 'd2v_errors_total{code="NOT_FOUND",model="-"}' in body  # no label per unknown name
    for stage in ("preprocess", "queue", "inference", "postprocess", "total"):
        assert f'stage="{stage}"' in body


def test_sigterm_drains_in_flight_requests(models: dict[str, TinyModel], tmp_path: Path) -> None:
    """The real d2v-serve process: gRPC and HTTP requests in flight when SIGTERM arrives all complete; exit code 0."""
    (tmp_path / "text.onnx").symlink_to(models["text"].path)
    port, http_port = _free_port(), _free_port()
    exe = Path(sys.executable).with_name("d2v-serve")
    env = {**os.environ, "D2V_MAX_DELAY_MS": "400", "D2V_METRICS_PORT": "0"}  # env vars configure it too
    proc = subprocess.Popen([str(exe), "--models", str(tmp_path), "--port", str(port), "--host", "127.0.0.1",
                             "--http-port", str(http_port)], env=env, stderr=subprocess.PIPE, text=True)
    target = f"127.0.0.1:{port}"

    def over_http(text: str) -> np.ndarray:
        body = json.dumps({"model": "text", "inputs": [{"text": text}]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/embed", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return np.asarray(json.loads(response.read())["embeddings"][0]["tensor"]["data"], np.float32)

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if _health(target) == "SERVING":
                    break
            except grpc.RpcError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not come up"
            time.sleep(0.1)
        with Client(target) as c, concurrent.futures.ThreadPoolExecutor(18) as pool:
            in_flight = [pool.submit(c.embed, TEXTS[i % len(TEXTS)], "text") for i in range(12)]
            in_flight += [pool.submit(over_http, TEXTS[i % len(TEXTS)]) for i in range(6)]
            time.sleep(0.15)  # admitted, mostly still queued or running when the signal arrives
            proc.send_signal(signal.SIGTERM)
            results = [f.result(timeout=30) for f in in_flight]
        assert all(r.shape == (HIDDEN,) for r in results)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    logs = [json.loads(line) for line in proc.stderr.read().splitlines()]  # every line is JSON (ORT's too)
    messages = [entry["msg"] for entry in logs]
    assert "serving" in messages and "draining" in messages and messages[-1] == "stopped"


# ---- command lines ------------------------------------------------------------------------------------------


def test_d2v_embed_cli(server: ServerThread, client: Client, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from d2v_serve.cli import embed_main

    wavs = []
    for i, seconds in enumerate((0.4, 0.9)):
        wavs.append(tmp_path / f"clip{i}.wav")
        wavs[-1].write_bytes(encode_audio(tone(seconds, seed=i), 16000, "WAV"))
    out = tmp_path / "clips.npy"
    assert embed_main([*map(str, wavs), "--server", server.target, "--model", "audio", "-o", str(out)]) == 0
    expected = client.embed([w.read_bytes() for w in wavs], "audio")
    np.testing.assert_allclose(np.load(out), np.stack(expected), atol=1e-6)
    assert embed_main([str(wavs[0]), "--server", server.target, "--model", "audio", "-o", str(out)]) == 0
    assert np.load(out).shape == (1, HIDDEN)  # one input still has the inputs axis

    png = tmp_path / "pic.png"
    png.write_bytes(encode_image(picture(40, 40), "PNG"))
    npz = tmp_path / "pic.npz"
    assert embed_main([str(png), "--server", server.target, "--pooling", "none", "-o", str(npz)]) == 0
    assert np.load(npz)[str(png)].shape == (IMAGE_POSITIONS, HIDDEN)  # keys: the paths as given

    mixed = tmp_path / "mixed.npz"  # no --model: each modality goes to its model, the order is kept
    assert embed_main([str(wavs[0]), str(png), str(wavs[1]), "--server", server.target, "-o", str(mixed)]) == 0
    got = np.load(mixed)
    np.testing.assert_allclose(got[str(png)], client.embed(png.read_bytes(), "image"), atol=1e-6)
    np.testing.assert_allclose(np.stack([got[str(w)] for w in wavs]), np.stack(expected), atol=1e-6)
    assert embed_main([str(wavs[0]), str(wavs[0]), "--server", server.target, "-o", str(mixed)]) == 0
    assert sorted(np.load(mixed).files) == sorted([str(wavs[0]), f"{wavs[0]}#2"])
    assert embed_main(["--text", "one", "two", "--server", server.target, "--model", "text", "-o", str(mixed)]) == 0
    assert sorted(np.load(mixed).files) == ["text_0", "text_1"]

    junk = tmp_path / "junk.wav"  # no header at all: sent as audio by its suffix; the server names what failed
    junk.write_bytes(b"\x00junk" * 50)
    capsys.readouterr()
    assert embed_main([str(junk), "--server", server.target]) == 1
    err = capsys.readouterr().err
    assert err.startswith("d2v-embed: INVALID_ARGUMENT: input 0: cannot decode audio") and err.count("\n") == 1
    assert err.rstrip().endswith(f"({junk})")
    unknown = tmp_path / "notes.bin"
    unknown.write_bytes(b"\x00junk" * 50)
    assert embed_main([str(png), str(unknown), "--server", server.target]) == 1
    err = capsys.readouterr().err
    assert err == f"d2v-embed: input 1: not an audio or image file (unknown suffix and header) ({unknown})\n"
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF1234WAVEjunk")
    capsys.readouterr()
    assert embed_main([str(png), str(wavs[0]), str(bad), "--server", server.target]) == 1
    err = capsys.readouterr().err
    assert err.startswith("d2v-embed: INVALID_ARGUMENT: input 2: cannot decode audio") and str(bad) in err

    capsys.readouterr()
    assert embed_main(["--text", "hello world", "zebras", "--server", server.target, "--model", "text",
                       "--normalize", "--representation", "target"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [d["input"] for d in doc] == ["hello world", "zebras"] and doc[0]["shape"] == [HIDDEN]
    np.testing.assert_allclose(doc[1]["embedding"], client.embed("zebras", "text", normalize=True,
                                                                 representation="target"), atol=1e-6)

    assert embed_main(["--text", "fine", "", "--server", server.target, "--model", "text"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("d2v-embed: INVALID_ARGUMENT: input 1") and "\n" not in err
    assert embed_main([str(tmp_path / "missing.wav"), "--server", server.target]) == 1
    assert "no such file" in capsys.readouterr().err
    assert embed_main(["--list-models", "--server", server.target]) == 0
    assert {m["name"] for m in json.loads(capsys.readouterr().out)} == {"audio", "image", "text", "text-int8"}


def test_d2v_serve_exits_with_a_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    from d2v_serve import cli, logs

    monkeypatch.setattr(logs, "setup_logging", lambda *a, **k: None)  # keep pytest's log handlers
    monkeypatch.setattr(cli, "DEMO_MODELS", tmp_path / "demo_models")
    assert cli.serve_main(["--port", "0", "--metrics-port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no --models given and no bundled demo models" in err
    (tmp_path / "empty").mkdir()
    assert cli.serve_main(["--models", str(tmp_path / "empty"), "--port", "0", "--metrics-port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no *.onnx model files" in err


def test_tls_and_mtls(text_only: Path, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    pem = cert.read_bytes()
    with ServerThread(text_only, tls_cert=str(cert), tls_key=str(key)) as srv:
        with Client(srv.target, root_certificates=pem, server_name="d2v.test") as c:
            assert c.embed("over tls", "text").shape == (HIDDEN,)
        with Client(srv.target, timeout=1) as plain:
            assert rpc_error(plain.embed, "plaintext", "text").code == Code.UNAVAILABLE
    with ServerThread(text_only, tls_cert=str(cert), tls_key=str(key), tls_client_ca=str(cert)) as srv:
        with Client(srv.target, root_certificates=pem, server_name="d2v.test", timeout=1) as anonymous:
            assert rpc_error(anonymous.embed, "no client certificate", "text").code == Code.UNAVAILABLE
        with Client(srv.target, root_certificates=pem, server_name="d2v.test",
                    client_cert=(key.read_bytes(), pem)) as c:
            assert c.embed("mutual tls", "text").shape == (HIDDEN,)
