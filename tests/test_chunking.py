"""Chunking of long audio and text: window plans, the join (stitched at the overlap midpoints, pooled exactly), and
the option end to end through gRPC, HTTP, the Python client and d2v-embed."""

from __future__ import annotations

import base64
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from d2v_serve._proto.d2v.v1 import embedder_pb2 as pb
from d2v_serve.client import Client, EmbedError, Pcm, options, to_input
from d2v_serve.core.chunking import DEFAULT_AUDIO_WINDOW_S, Window, audio_windows, join, text_windows
from d2v_serve.preprocess import audio_frames, collate, normalize_waveform
from d2v_serve.transport.tensors import from_tensor
from tests.serve_fixtures import ServerThread, TinyModel, encode_audio, make_tiny_model, tone

CONV = [[32, 10, 5]] + [[32, 3, 2]] * 4 + [[32, 2, 2]] * 2  # the reference front end: stride 320, field 400
RATE = 16000
HIDDEN = 64  # the tiny presets
LONG_TEXT = " ".join(f"the quick brown fox {i} jumps over the lazy dog number {i}." for i in range(8))


# ---- window plans and the join -------------------------------------------------------------------------------


def furthest_from_edge(windows: list[Window], position: int) -> set[int]:
    """The windows (indices) in which `position` lies furthest from an edge."""
    distance = {i: min(position - w.offset, w.offset + w.positions - 1 - position)
                for i, w in enumerate(windows) if w.offset <= position < w.offset + w.positions}
    best = max(distance.values())
    return {i for i, d in distance.items() if d == best}


def check_plan(windows: list[Window], total: int) -> None:
    """Kept ranges tile [0, total); every kept position comes from a window where it is furthest from an edge."""
    assert windows[0].keep[0] == 0 and windows[-1].keep[1] == total
    for left, right in zip(windows, windows[1:], strict=False):
        assert left.keep[1] == right.keep[0]
    for i, w in enumerate(windows):
        assert w.offset <= w.keep[0] <= w.keep[1] <= w.offset + w.positions
        for position in range(*w.keep):
            assert i in furthest_from_edge(windows, position), (i, position)


@pytest.mark.parametrize("samples", [400, 16000, 32000, 32001, 100_000, 161_234, 600 * RATE])
@pytest.mark.parametrize(("window", "overlap"), [(32000, 8000), (250_000, 16000), (16000, 0), (8000, 4000)])
def test_audio_plan_covers_every_frame_once(samples: int, window: int, overlap: int) -> None:
    windows = audio_windows(samples, window, overlap, CONV)
    total = int(audio_frames(samples, CONV))
    assert windows[-1].end == samples and windows[0].start == 0
    for w in windows:
        assert w.start % 320 == 0 and w.end - w.start <= max(window, samples if len(windows) == 1 else 0)
        assert w.positions == audio_frames(w.end - w.start, CONV)  # a window's frames are the input's frames
        assert w.offset * 320 == w.start
    assert windows[-1].offset + windows[-1].positions == total
    if len(windows) > 2:
        assert {w.end - w.start for w in windows[:-1]} == {window // 320 * 320}  # all but the last alike
    check_plan(windows, total)


@pytest.mark.parametrize("tokens", [1, 10, 62, 63, 64, 200, 1000])
@pytest.mark.parametrize(("window", "overlap"), [(64, 31), (64, 0), (16, 5), (512, 64)])
def test_text_plan_covers_every_token_once(tokens: int, window: int, overlap: int) -> None:
    windows = text_windows(tokens, window, overlap)
    assert windows[0].start == 0 and windows[-1].end == tokens
    for w in windows:
        assert w.positions == w.end - w.start + 2 <= window and w.offset == w.start
    for left, right in zip(windows, windows[1:], strict=False):
        assert left.end - right.start >= overlap  # neighbours share at least the overlap
    check_plan(windows, tokens + 2)
    kept_specials = [p for w in windows for p in range(*w.keep) if p - w.offset in (0, w.positions - 1)]
    assert kept_specials == [0, tokens + 1]  # only the input's own <s> and </s>: never a window's inner ones


def test_plan_refuses_impossible_windows() -> None:
    with pytest.raises(ValueError, match="one frame"):
        audio_windows(100_000, 300, 0, CONV)
    with pytest.raises(ValueError, match="shorter than the window"):
        audio_windows(100_000, 16000, 16000, CONV)
    with pytest.raises(ValueError, match="exceed the overlap"):
        text_windows(100, 10, 8)


def test_join_pooled_is_the_mean_of_the_stitched() -> None:
    rng = np.random.default_rng(0)
    windows = text_windows(300, 64, 16)
    outputs = [rng.standard_normal((w.positions, 8)).astype(np.float32) for w in windows]
    stitched = join([o[slice(*w.local_keep)] for w, o in zip(windows, outputs, strict=True)], windows, "none")
    assert stitched.shape == (302, 8)
    sums = [o[slice(*w.local_keep)].sum(axis=0, dtype=np.float64) for w, o in zip(windows, outputs, strict=True)]
    np.testing.assert_allclose(join(sums, windows, "mean"), stitched.mean(axis=0), atol=1e-6)
    np.testing.assert_array_equal(join([o[0] for o in outputs], windows, "cls"), outputs[0][0])


# ---- end to end -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyModel]:
    directory = tmp_path_factory.mktemp("models")
    return {m: make_tiny_model(m, directory) for m in ("audio", "image", "text")}


@pytest.fixture(scope="module")
def server(models: dict[str, TinyModel]) -> Iterator[ServerThread]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        http_port = s.getsockname()[1]
    with ServerThread(models["text"].path.parent, http_port=http_port, max_audio_seconds=20,
                      max_chunked_audio_seconds=40, max_chunked_tokens=600) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[Client]:
    with Client(server.target) as c:
        yield c


_sessions: dict[Path, ort.InferenceSession] = {}


def run_alone(model: TinyModel, value: np.ndarray, output: str = "last_hidden_state") -> np.ndarray:
    """The model file run by onnxruntime on one window: its valid positions of `output`."""
    if model.path not in _sessions:
        _sessions[model.path] = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    feeds = collate(model.modality, [value], pad_id=getattr(model.preprocessing, "pad_id", 1))
    hidden, mask = _sessions[model.path].run([output, "output_mask"], feeds)
    return hidden[0][mask[0].astype(bool)]


def expected_stitch(alone: list[np.ndarray], spans: list[tuple[int, int]]) -> np.ndarray:
    """Cut independently of the server's plan: every position from the window where it is furthest from an edge
    (`spans`: each window's [first, end) positions of the whole input; a tie goes to the earlier window)."""
    total = spans[-1][1]
    rows = []
    for p in range(total):
        best = max((min(p - a, b - 1 - p), -i) for i, (a, b) in enumerate(spans) if a <= p < b)
        i = -best[1]
        rows.append(alone[i][p - spans[i][0]])
    return np.stack(rows)


def audio_request(samples: np.ndarray, window: float, overlap: float, pooling: str = "none",
                  representation: str = "last") -> pb.EmbedRequest:
    return pb.EmbedRequest(model="audio", inputs=[to_input(Pcm(samples, RATE))], options=options(
        pooling=pooling, representation=representation, chunk=True, window=window, overlap=overlap, windows=True))


@pytest.mark.parametrize("representation", ["last", "target"])
def test_audio_stitched_equals_windows_alone_cut_at_midpoints(client: Client, models: dict[str, TinyModel],
                                                              representation: str) -> None:
    model = models["audio"]
    samples = tone(7.3, seed=3)
    output = {"last": "last_hidden_state", "target": "target_hidden_state"}[representation]
    embedding = client.embed_request(audio_request(samples, 2.0, 0.5, representation=representation)).embeddings[0]
    stitched = from_tensor(embedding.tensor)
    total = int(audio_frames(len(samples), model.meta.conv_layers))
    assert stitched.shape == (total, HIDDEN) and embedding.positions == total
    windows = list(embedding.windows)
    assert len(windows) == 5 and windows[0].start == 0 and windows[-1].end == pytest.approx(len(samples) / RATE)
    alone, spans = [], []
    for w in windows:
        start, end = round(w.start * RATE), round(w.end * RATE)
        assert start % 320 == 0
        value = normalize_waveform(samples[start:end])  # each window normalised on its own, as in training
        alone.append(run_alone(model, value, output))
        spans.append((start // 320, start // 320 + len(alone[-1])))
        np.testing.assert_allclose(from_tensor(w.tensor), alone[-1], atol=1e-5, rtol=0)  # the breakdown
        assert w.positions == len(alone[-1])
    np.testing.assert_allclose(stitched, expected_stitch(alone, spans), atol=1e-5, rtol=0)
    assert [(w.kept_start, w.kept_end) for w in windows][-1][1] == total

    if representation == "target":
        return  # mean pooling of the audio target space is refused (it is normalised over time)
    pooled = client.embed_request(audio_request(samples, 2.0, 0.5, "mean", representation)).embeddings[0]
    np.testing.assert_allclose(from_tensor(pooled.tensor), stitched.mean(axis=0), atol=1e-5, rtol=0)
    assert pooled.positions == total
    windows_pooled = [from_tensor(w.tensor) for w in pooled.windows]
    np.testing.assert_allclose(windows_pooled[1], alone[1].mean(axis=0), atol=1e-5, rtol=0)


def test_text_stitched_equals_windows_alone_cut_at_midpoints(client: Client, models: dict[str, TinyModel]) -> None:
    model = models["text"]
    pre = model.preprocessing
    ids = np.asarray(pre.tokenizer.encode(LONG_TEXT).ids, dtype=np.int64)
    assert ids[0] == pre.bos_id and ids[-1] == pre.eos_id and len(ids) > 200
    request = pb.EmbedRequest(model="text", inputs=[pb.Input(text=LONG_TEXT)],
                              options=options(pooling="none", chunk=True, windows=True))
    response = client.embed_request(request)
    embedding = response.embeddings[0]
    stitched = from_tensor(embedding.tensor)
    assert stitched.shape == (len(ids), HIDDEN) and embedding.positions == len(ids)
    assert response.usage.tokens == len(ids) and response.usage.positions == len(ids)
    alone, spans = [], []
    for w in embedding.windows:
        start, end = int(w.start), int(w.end)  # token positions of the whole input
        value = np.concatenate([[pre.bos_id], ids[start:end], [pre.eos_id]]).astype(np.int64)
        assert len(value) <= 64
        alone.append(run_alone(model, value))
        spans.append((start - 1, end + 1))  # the window's <s> and </s> fall on the neighbours' tokens
        np.testing.assert_allclose(from_tensor(w.tensor), alone[-1], atol=1e-5, rtol=0)
    assert len(alone) >= 4
    np.testing.assert_allclose(stitched, expected_stitch(alone, spans), atol=1e-5, rtol=0)
    pooled = client.embed(LONG_TEXT, "text", chunk=True)
    np.testing.assert_allclose(pooled, stitched.mean(axis=0), atol=1e-5, rtol=0)
    cls = client.embed(LONG_TEXT, "text", chunk=True, pooling="cls", normalize=True)
    np.testing.assert_allclose(cls, alone[0][0] / np.linalg.norm(alone[0][0]), atol=1e-5, rtol=0)


def test_long_and_short_inputs_in_one_request(client: Client) -> None:
    long = tone(9.0, seed=1)
    shorts = [tone(0.7, seed=2), tone(1.9, seed=4)]
    inputs = [Pcm(shorts[0], RATE), Pcm(long, RATE), Pcm(shorts[1], RATE)]
    mixed = client.embed(inputs, "audio", chunk=True, window=2.0, overlap=0.5, pooling="none")
    plain = client.embed([Pcm(s, RATE) for s in shorts], "audio", pooling="none")
    np.testing.assert_array_equal(mixed[0], plain[0])  # inputs within one window run exactly as without chunking
    np.testing.assert_array_equal(mixed[2], plain[1])
    assert mixed[1].shape[0] == audio_frames(len(long), CONV)
    alone = client.embed(Pcm(long, RATE), "audio", chunk=True, window=2.0, overlap=0.5, pooling="none")
    np.testing.assert_allclose(mixed[1], alone, atol=1e-5, rtol=0)  # batch-mates do not move a window's output


def test_defaults_limits_and_errors(client: Client, server: ServerThread, models: dict[str, TinyModel]) -> None:
    audio = client.describe_model("audio")
    assert audio["chunk_window"] == DEFAULT_AUDIO_WINDOW_S and audio["chunk_overlap"] == 1.0  # no crop recorded
    assert audio["max_chunked_audio_seconds"] == 40
    text = client.describe_model("text")
    assert (text["chunk_window"], text["chunk_overlap"], text["max_chunked_tokens"]) == (64, 31, 600)

    long = tone(21.0)
    error = pytest.raises(EmbedError, client.embed, Pcm(long, RATE), "audio").value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT  # unchunked: over --max-audio-seconds
    _, windows = client.embed_windows(Pcm(long, RATE), "audio")  # the default window, 15.6 s
    assert [w["start"] for w in windows] == pytest.approx([0.0, 5.38]) and windows[1]["end"] == 21.0
    assert windows[0]["end"] == pytest.approx(15.62)

    too_long = encode_audio(tone(41.0), RATE, "FLAC")
    error = pytest.raises(EmbedError, client.embed, too_long, "audio", chunk=True).value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and "--max-chunked-audio-seconds" in error.message
    assert error.input_index == 0
    cut = client.embed_request(pb.EmbedRequest(model="audio", inputs=[pb.Input(audio=too_long)], options=options(
        chunk=True, truncate=True))).embeddings[0]
    assert cut.truncated and cut.positions == audio_frames(40 * RATE, CONV)

    huge_text = " ".join(["word"] * 700)
    error = pytest.raises(EmbedError, client.embed, huge_text, "text", chunk=True).value
    assert "--max-chunked-tokens" in error.message and error.code == grpc.StatusCode.INVALID_ARGUMENT
    response = client.embed_request(pb.EmbedRequest(model="text", inputs=[pb.Input(text=huge_text)],
                                                     options=options(chunk=True, truncate=True)))
    assert response.embeddings[0].truncated and response.embeddings[0].positions == 600

    bad = [({"window": 21.0}, "--max-audio-seconds"), ({"window": 2.0, "overlap": 2.0}, "shorter than the window"),
           ({"window": 0.01}, "one frame"), ({"overlap": -1.0}, ">= 0")]
    for kwargs, words in bad:
        error = pytest.raises(EmbedError, client.embed, Pcm(long, RATE), "audio", chunk=True, **kwargs).value
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT and words in error.message, (kwargs, error.message)
    for kwargs, words in [({"window": 65}, "over the model's 64"), ({"window": 40, "overlap": 38}, "no room"),
                          ({"window": 20.5}, "whole tokens")]:
        error = pytest.raises(EmbedError, client.embed, LONG_TEXT, "text", chunk=True, **kwargs).value
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT and words in error.message, (kwargs, error.message)
    error = pytest.raises(EmbedError, client.embed_request, pb.EmbedRequest(
        model="image", inputs=[pb.Input(image=b"\x89PNG")], options=options(chunk=True))).value
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and "chunking applies to audio and text" in error.message
    with pytest.raises(ValueError, match="need chunk=True"):
        options(window=3.0)


def test_http_mirrors_the_chunking_option(server: ServerThread, client: Client) -> None:
    samples = tone(6.1, seed=5)
    body = {"model": "audio", "inputs": [{"pcm": {"data": base64.b64encode(samples.astype("<f4").tobytes()).decode(),
                                                  "encoding": "float32", "sample_rate": RATE}}],
            "options": {"pooling": "none", "chunking": {"enabled": True, "window": 2.0, "overlap": 0.4,
                                                        "windows": True}},
            "data_format": "base64"}
    request = urllib.request.Request(f"{server.http_url}/v1/embed", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.load(response)
    embedding = answer["embeddings"][0]
    got = np.frombuffer(base64.b64decode(embedding["tensor"]["data"]), "<f4").reshape(embedding["tensor"]["shape"])
    grpc_side = client.embed_request(audio_request(samples, 2.0, 0.4)).embeddings[0]
    np.testing.assert_array_equal(got, from_tensor(grpc_side.tensor))
    assert [(w["start"], w["end"], w["kept_start"], w["kept_end"]) for w in embedding["windows"]] == [
        (w.start, w.end, w.kept_start, w.kept_end) for w in grpc_side.windows]
    assert answer["usage"]["audio_frames"] == embedding["positions"] == grpc_side.positions

    body["options"]["chunking"] = {"enabled": True, "window": 30.0}
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(urllib.request.Request(f"{server.http_url}/v1/embed", data=json.dumps(body).encode(),
                                                      headers={"Content-Type": "application/json"}), timeout=30)
    assert info.value.code == 400 and "--max-audio-seconds" in json.load(info.value)["error"]["message"]


def test_client_windows_and_cli_flags(server: ServerThread, client: Client, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from d2v_serve.cli import embed_main

    samples = tone(5.5, seed=7)
    joined, windows = client.embed_windows(Pcm(samples, RATE), "audio", window=2.0, overlap=0.5)
    assert joined.shape == (HIDDEN,) and len(windows) == 4
    assert windows[-1]["kept_end"] == audio_frames(len(samples), CONV) and windows[0]["embedding"].shape == (HIDDEN,)

    wav = tmp_path / "long.wav"
    wav.write_bytes(encode_audio(samples, RATE, "WAV"))
    out = tmp_path / "out.npz"
    assert embed_main([str(wav), "--server", server.target, "--model", "audio", "--chunk", "--window", "2",
                       "--overlap", "0.5", "--pooling", "none", "-o", str(out)]) == 0
    served = np.load(out)[str(wav)]
    from d2v_serve.preprocess import decode_audio

    decoded, rate = decode_audio(wav.read_bytes())
    expected = client.embed(Pcm(decoded, rate), "audio", chunk=True, window=2.0, overlap=0.5, pooling="none")
    np.testing.assert_array_equal(served, expected)
    assert embed_main([str(wav), "--server", server.target, "-o", str(out)]) == 0  # 5.5 s fits: no chunking needed
    with pytest.raises(SystemExit):
        embed_main([str(wav), "--server", server.target, "--window", "2"])
    assert "--window and --overlap need --chunk" in capsys.readouterr().err


def test_export_records_the_audio_training_crop() -> None:
    from d2v.export.metadata import build_metadata, training_crop_seconds
    from d2v.training.checkpoint import encoder_config
    from tests.factories import tiny_checkpoint

    ckpt = tiny_checkpoint("audio")
    assert training_crop_seconds(ckpt) is None  # no training config (e.g. imported): the server's default applies
    ckpt["training"] = {"config": {"data": {"max_samples": 250_000}}}
    meta = build_metadata(ckpt, encoder_config(ckpt), precision="fp32", checkpoint="a.pt", checkpoint_sha256="0",
                          opset=18, parity={})
    assert meta.training_crop_seconds == 15.625
    from d2v_serve.core.chunking import audio_defaults

    assert audio_defaults(meta.training_crop_seconds, 16000, 120.0, 3600.0).window == 15.625
    assert audio_defaults(30.0, 16000, 20.0, 3600.0).window == 20.0


def test_response_size_counts_stitched_positions_and_windows(models: dict[str, TinyModel], tmp_path: Path) -> None:
    (tmp_path / "audio.onnx").symlink_to(models["audio"].path)
    samples = (tone(25.0, seed=9) * 20000).astype(np.int16)  # 800 KB of int16 PCM: within a 1 MiB message
    with ServerThread(tmp_path, max_message_mb=1) as srv, Client(srv.target) as client:
        stitched = client.embed(Pcm(samples, RATE), "audio", chunk=True, window=2.0, overlap=1.5, pooling="none")
        assert stitched.shape == (audio_frames(len(samples), CONV), HIDDEN)  # 320 KB: fits
        request = pb.EmbedRequest(model="audio", inputs=[to_input(Pcm(samples, RATE))], options=options(
            chunk=True, window=2.0, overlap=1.5, pooling="none", windows=True))  # + 47 windows x 99 frames
        error = pytest.raises(EmbedError, client.embed_request, request).value
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT and "over the 1 MiB message limit" in error.message
