"""Untrusted bytes cost no more than their limits: the hostile corpus (tests/hostile.py) through the shared
preprocessing and through a real server with the demo models; each refusal is INVALID_ARGUMENT with one line that
names the limit and its flag. Timings live in docs/reliability.md, never here."""

from __future__ import annotations

import json
import re
import tracemalloc
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from d2v_serve._proto.d2v.v1 import embedder_pb2 as pb
from d2v_serve._proto.d2v.v1 import embedder_pb2_grpc as pb_grpc
from d2v_serve.cli import DEMO_MODELS
from d2v_serve.models.model_file import read_metadata
from d2v_serve.preprocess import (
    AudioPreprocessing,
    InputTooLarge,
    InputTooLong,
    PreprocessError,
    clip_text,
    decode_audio,
    decode_image,
    pcm_to_waveform,
    preprocessing_from_dict,
)
from tests import hostile
from tests.serve_fixtures import ServerThread

CORPUS = hostile.corpus()
ADDRESS = re.compile(r"0x[0-9a-f]{6,}|object at")
PCM_ENCODING = {"float32": pb.Pcm.ENCODING_FLOAT32, "int16": pb.Pcm.ENCODING_INT16}
DEMO_TEXT = preprocessing_from_dict("text", read_metadata(DEMO_MODELS / "demo-text.onnx").preprocessing)
MODEL = {"audio": "demo-audio", "pcm": "demo-audio", "image": "demo-image", "text": "demo-text"}


def preprocess(case: hostile.Hostile, max_seconds: float = 120.0, truncate: bool = False) -> np.ndarray:
    """The shared preprocessing of one case with the server's default limits (text: the demo model's 8192 chars)."""
    if case.kind == "audio":
        return AudioPreprocessing().prepare(*decode_audio(case.value, max_seconds, truncate))
    if case.kind == "pcm":
        pcm = case.value
        wave = pcm_to_waveform(pcm.data, pcm.encoding, pcm.channels, pcm.sample_rate, max_seconds, truncate)
        return AudioPreprocessing().prepare(wave, pcm.sample_rate)
    if case.kind == "image":
        return np.asarray(decode_image(case.value, 40_000_000))
    text, _ = clip_text(case.value, 8192, truncate)
    return DEMO_TEXT.prepare(text, truncate=True)


# ---- the shared preprocessing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.name)
def test_preprocessing_refuses_or_accepts_each_hostile_input(case: hostile.Hostile) -> None:
    if case.expect == "ok" or case.reason == "needs at least":  # the model's own minimum, checked by the server
        preprocess(case)
    elif case.reason.startswith("--"):  # a limit: the server adds the flag to the message
        with pytest.raises(InputTooLarge):
            preprocess(case)
    else:
        with pytest.raises(PreprocessError) as info:
            preprocess(case)
        message = str(info.value)
        assert case.reason in message and "\n" not in message and not ADDRESS.search(message)


def test_limits_are_checked_from_headers_before_decoding() -> None:
    bomb = hostile.silence_flac(10.0)  # 10 min of stereo 48 kHz in a few KB
    with pytest.raises(InputTooLong, match=r"600\.0 s by its header, the limit is 120 s") as info:
        decode_audio(bomb, max_seconds=120.0)
    assert info.value.limit == "max_audio_seconds"
    with pytest.raises(InputTooLarge, match="13370x13370 = 178.8 MP by its header, the limit is 40 MP") as info:
        decode_image(hostile.png_bomb(13370), max_pixels=40_000_000)
    assert info.value.limit == "max_image_pixels"
    with pytest.raises(InputTooLong, match="9000 characters, the limit is 8192") as info:
        clip_text("a" * 9000, 8192, truncate=False)
    assert info.value.limit == "max_text_chars"
    with pytest.raises(InputTooLong, match=r"121\.0 s, the limit is 120 s"):
        pcm_to_waveform(bytes(2 * 16000 * 121), "int16", sample_rate=16000, max_seconds=120.0)


def test_truncation_decodes_only_the_limit_plus_one_frame() -> None:
    bomb = hostile.silence_flac(10.0)
    wave, rate = decode_audio(bomb, max_seconds=2.0, truncate=True)
    assert rate == 48000 and len(wave) == 2 * 48000 + 1  # the extra frame says "it was longer"
    pcm = pcm_to_waveform(bytes(4 * 16000 * 5), "float32", sample_rate=16000, max_seconds=2.0, truncate=True)
    assert len(pcm) == 2 * 16000 + 1
    text, cut = clip_text("ab" * 100, 50, truncate=True)
    assert (text, cut) == ("ab" * 25, True)
    assert clip_text("short", 50, truncate=False) == ("short", False)


def test_a_lying_header_never_allocates_from_its_claim() -> None:
    """A FLAC claiming 2^36-1 samples (256 GiB as float32) that holds one second, decoded with truncation or with no
    limit at all (training): blockwise reads stop where libsndfile loses the stream, nothing sized from the claim.
    A WAV whose data chunk claims 4 GiB gives what it holds."""
    tracemalloc.start()
    try:
        for limit in (120.0, None):
            with pytest.raises(PreprocessError, match="cannot decode audio"):
                decode_audio(hostile.flac_claiming(2**36 - 1), max_seconds=limit, truncate=True)
        wave, rate = decode_audio(hostile.wav_claiming(0xFFFFFFF0), max_seconds=120.0, truncate=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(wave) == rate == 16000
    assert peak < 32 * 2**20


def test_header_claiming_fewer_samples_than_it_holds_reads_only_the_claim() -> None:
    wave, _ = decode_audio(hostile.flac_claiming(10), max_seconds=120.0)
    assert len(wave) == 10


def test_sample_rate_range_is_the_same_for_files_and_pcm() -> None:
    for rate, ok in ((999, False), (1000, True), (384_000, True), (384_001, False)):
        pcm = np.zeros(2000, np.float32).tobytes()
        if ok:
            decode_audio(hostile.wav_with_rate(rate), max_seconds=120.0)
            pcm_to_waveform(pcm, "float32", sample_rate=rate, max_seconds=120.0)
        else:
            with pytest.raises(PreprocessError, match=f"sample rate {rate} Hz is outside 1000-384000 Hz"):
                decode_audio(hostile.wav_with_rate(rate), max_seconds=120.0)
            with pytest.raises(PreprocessError, match=f"sample rate {rate} Hz is outside 1000-384000 Hz"):
                pcm_to_waveform(pcm, "float32", sample_rate=rate, max_seconds=120.0)


def test_animated_image_gives_its_first_frame() -> None:
    img = decode_image(hostile.animated_gif(50), max_pixels=40_000_000)
    first = decode_image(hostile.image_bytes(hostile.Image.new("P", (64, 64), color=0), "GIF"))
    np.testing.assert_array_equal(np.asarray(img), np.asarray(first))


def test_odd_image_modes_become_rgb() -> None:
    for mode in ("CMYK", "I;16", "P", "LA", "1", "I", "F"):
        fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode in ("I", "F") else "PNG"
        img = decode_image(hostile.image_bytes(hostile.picture(16, 16, mode), fmt), max_pixels=40_000_000)
        assert img.mode == "RGB" and img.size == (16, 16)


def test_formats_outside_the_list_are_refused_without_running_their_plugins() -> None:
    with pytest.raises(PreprocessError, match="not a BMP, GIF, JPEG, PNG, TIFF, WEBP file"):
        decode_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")


# ---- through a real server with the demo models -----------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_server() -> Iterator[ServerThread]:
    with ServerThread(DEMO_MODELS) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(demo_server: ServerThread) -> Iterator[pb_grpc.EmbedderStub]:
    with grpc.insecure_channel(demo_server.target, options=[("grpc.max_send_message_length", -1)]) as channel:
        yield pb_grpc.EmbedderStub(channel)


def to_input(case: hostile.Hostile) -> pb.Input:
    if case.kind == "pcm":
        p = case.value
        return pb.Input(pcm=pb.Pcm(data=p.data, encoding=PCM_ENCODING[p.encoding], sample_rate=p.sample_rate,
                                   channels=p.channels))
    return pb.Input(**{case.kind: case.value})


SERVABLE = [c for c in CORPUS if c.name != "text-unpaired-surrogate"]  # protobuf cannot encode a lone surrogate


@pytest.mark.parametrize("case", SERVABLE, ids=lambda c: c.name)
def test_server_answers_each_hostile_input(stub: pb_grpc.EmbedderStub, case: hostile.Hostile) -> None:
    request = pb.EmbedRequest(model=MODEL[case.kind], inputs=[to_input(case)])
    if case.expect == "ok":
        response = stub.Embed(request, timeout=60)
        assert len(response.embeddings) == 1
        return
    with pytest.raises(grpc.RpcError) as info:
        stub.Embed(request, timeout=60)
    error = info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert case.reason in error.details() and "\n" not in error.details() and not ADDRESS.search(error.details())


def test_refusals_name_the_limit_and_the_flag(stub: pb_grpc.EmbedderStub) -> None:
    cases = {
        hostile.Hostile("a", "audio", hostile.silence_flac(3.0), "invalid"):
            "input 0: audio is 180.0 s by its header, the limit is 120 s (--max-audio-seconds raises it; set "
            "options.truncate to cut it)",
        hostile.Hostile("i", "image", hostile.png_bomb(8000), "invalid"):
            "input 0: image is 8000x8000 = 64.0 MP by its header, the limit is 40 MP (--max-image-pixels raises it)",
        hostile.Hostile("t", "text", "x" * 10_000, "invalid"):
            "input 0: text is 10000 characters, the limit is 8192 (--max-text-chars raises it; set options.truncate "
            "to cut it)",
    }
    for case, message in cases.items():
        with pytest.raises(grpc.RpcError) as info:
            stub.Embed(pb.EmbedRequest(model=MODEL[case.kind], inputs=[to_input(case)]), timeout=60)
        assert (info.value.code(), info.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)


def test_truncate_cuts_long_text_and_audio_at_the_limits(stub: pb_grpc.EmbedderStub) -> None:
    options = pb.EmbedOptions(truncate=True, pooling=pb.POOLING_NONE)
    text = stub.Embed(pb.EmbedRequest(model="demo-text", inputs=[pb.Input(text="word " * 100_000)],
                                      options=options), timeout=60)
    assert text.embeddings[0].truncated and text.usage.tokens == 256
    audio = stub.Embed(pb.EmbedRequest(model="demo-audio", inputs=[pb.Input(audio=hostile.silence_flac(3.0))],
                                       options=options), timeout=60)
    assert audio.embeddings[0].truncated and audio.usage.audio_seconds == pytest.approx(120.0)


# ---- the wire, auth, response size, bounds, shutdown ------------------------------------------------------------

# a length past the end, a text that is not UTF-8 (a lone surrogate), junk
MALFORMED = [b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x05\x22\x03\xed\xa0\x80", b"\xff" * 32]


def raw_call(target: str, method: str, payload: bytes, metadata: tuple = ()) -> grpc.RpcError:
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(f"/d2v.v1.Embedder/{method}")  # no serializers: bytes go out as they are
        with pytest.raises(grpc.RpcError) as info:
            call(payload, timeout=30, metadata=metadata)
    return info.value


def test_malformed_frames_are_invalid_argument_logged_once(demo_server: ServerThread,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="d2v_serve.transport.wire"):
        for method in ("Embed", "ListModels", "DescribeModel"):
            for payload in MALFORMED if method == "Embed" else (MALFORMED[0], MALFORMED[2]):
                error = raw_call(demo_server.target, method, payload)
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error.details())
                assert "is not a valid d2v.v1." in error.details()
    records = [r for r in caplog.records if r.getMessage() == "malformed request"]
    assert len(records) <= 1 and all(r.exc_info is None for r in records)  # rate-limited, never a traceback


def test_malformed_stream_message_is_answered_in_band(demo_server: ServerThread) -> None:
    good = pb.EmbedRequest(model="demo-text", inputs=[pb.Input(text="fine")], request_id="1").SerializeToString()
    with grpc.insecure_channel(demo_server.target) as channel:
        stream = channel.stream_stream("/d2v.v1.Embedder/EmbedStream",
                                       response_deserializer=pb.EmbedResponse.FromString)
        responses = list(stream(iter([MALFORMED[1], good]), timeout=30))
    assert responses[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "not a valid d2v.v1.EmbedRequest" in responses[0].error.message
    assert responses[1].request_id == "1" and len(responses[1].embeddings) == 1


def test_auth_is_checked_before_any_byte_is_parsed() -> None:
    with ServerThread(DEMO_MODELS, auth_token="s3cret") as srv:
        error = raw_call(srv.target, "Embed", MALFORMED[0])
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        error = raw_call(srv.target, "Embed", MALFORMED[0], metadata=(("authorization", "Bearer s3cret"),))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_response_over_the_message_limit_is_refused_before_the_model_runs() -> None:
    from prometheus_client import REGISTRY

    def runs() -> float:
        return REGISTRY.get_sample_value("d2v_batch_size_count", {"model": "demo-text"}) or 0.0

    with ServerThread(DEMO_MODELS, max_message_mb=1) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = pb_grpc.EmbedderStub(channel)
        texts = [pb.Input(text="word " * 60)] * 64  # 64 x ~80 positions x 64 x 4 B = ~1.3 MiB with pooling "none"
        before = runs()
        with pytest.raises(grpc.RpcError) as info:
            stub.Embed(pb.EmbedRequest(model="demo-text", inputs=texts,
                                       options=pb.EmbedOptions(pooling=pb.POOLING_NONE)), timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "over the 1 MiB message limit (--max-message-mb raises it" in info.value.details()
        assert runs() == before
        pooled = stub.Embed(pb.EmbedRequest(model="demo-text", inputs=texts), timeout=60)  # 64 x 64 x 4 B: fine
        assert len(pooled.embeddings) == 64


def test_metrics_bind_the_server_host() -> None:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with ServerThread(DEMO_MODELS, host="127.0.0.1", metrics_port=port):
        assert b"d2v_requests_total" in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        with pytest.raises(OSError):  # another loopback address: not bound
            socket.create_connection(("127.0.0.2", port), timeout=5).close()


def test_calls_cut_by_shutdown_end_unavailable() -> None:
    import concurrent.futures
    import time

    srv = ServerThread(DEMO_MODELS).__enter__()
    try:
        runner = srv.server.models["demo-text"].runner
        original = runner.run

        def slow(feeds: dict, outputs: list) -> dict:
            time.sleep(3.0)
            return original(feeds, outputs)

        runner.run = slow
        with grpc.insecure_channel(srv.target) as channel, concurrent.futures.ThreadPoolExecutor(2) as pool:
            stub = pb_grpc.EmbedderStub(channel)
            call = pool.submit(stub.Embed, pb.EmbedRequest(model="demo-text", inputs=[pb.Input(text="slow")]),
                               timeout=30)
            time.sleep(0.5)  # it is in the model now
            srv.stop(grace=0.3)
            with pytest.raises(grpc.RpcError) as info:
                call.result()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert info.value.details().startswith("server is shutting down")
    finally:
        srv.stop()


def test_reliability_bench_smoke() -> None:
    """`python -m bench.reliability` against the real d2v-serve, in miniature: statuses only (its timings live in
    docs/reliability.md)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-m", "bench.reliability", "--sections", "bombs,soak,sigterm", "--repeat",
                             "1", "--soak-requests", "40"], capture_output=True, text=True, timeout=600, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout)
    assert len(figures["bombs"]) == 7 and all(row["status"] == {"INVALID_ARGUMENT": 1} for row in figures["bombs"])
    soak = figures["soak"]
    assert soak["statuses"] == {"OK": 30, "INVALID_ARGUMENT": 10}
    assert figures["sigterm"]["lost"] == 0 and figures["sigterm"]["exit_code"] == 0


def test_http_refuses_the_bombs_with_the_same_messages() -> None:
    """The limits live in the core and the preprocessing: the HTTP transport gets them too (400, same message)."""
    import base64
    import socket
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bombs = {
        "demo-audio": ({"audio": base64.b64encode(hostile.silence_flac(3.0)).decode()}, "--max-audio-seconds"),
        "demo-image": ({"image": base64.b64encode(hostile.png_bomb(8000)).decode()}, "--max-image-pixels"),
        "demo-text": ({"text": "x" * 10_000}, "--max-text-chars"),
    }
    with ServerThread(DEMO_MODELS, http_port=port) as srv:
        for model, (item, flag) in bombs.items():
            body = json.dumps({"model": model, "inputs": [item]}).encode()
            request = urllib.request.Request(f"{srv.http_url}/v1/embed", body, {"content-type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(request, timeout=60)
            assert info.value.code == 400
            assert f"({flag} raises it" in json.loads(info.value.read())["error"]["message"]
