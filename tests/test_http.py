"""The HTTP/JSON transport over real loopback HTTP against the bundled demo models: the official `openai` client,
the native /v1/embed, vectors identical to gRPC's, data URIs, status mapping, auth, TLS, health, metrics, OpenAPI."""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import json
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from d2v_serve.cli import DEMO_MODELS
from d2v_serve.client import Client
from tests.serve_fixtures import (
    ServerThread,
    encode_audio,
    encode_image,
    free_port,
    hold_batchers,
    picture,
    self_signed,
    tone,
)

TEXTS = ["hello world", "the quick brown fox jumps over the lazy dog", "zebras", "a server batches requests"]
TEXT_MODEL, IMAGE_MODEL, AUDIO_MODEL = "demo-text", "demo-image", "demo-audio"


def call(url: str, body: Any = None, *, method: str | None = None, headers: dict[str, str] | None = None,
         raw: bytes | None = None, context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], Any]:
    """One HTTP request: (status, headers, parsed JSON body or text)."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"),
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as response:
            status, head, text = response.status, _lower(response.headers), response.read().decode()
    except urllib.error.HTTPError as exc:
        status, head, text = exc.code, _lower(exc.headers), exc.read().decode()
    try:
        return status, head, json.loads(text)
    except json.JSONDecodeError:
        return status, head, text


def _lower(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def error_of(status: int, reply: tuple[int, dict[str, str], Any]) -> dict[str, Any]:
    """The error object of a reply that must have failed with `status`, checked for OpenAI's shape."""
    got, _, body = reply
    assert got == status, body
    error = body["error"]
    assert {"message", "type", "param", "code"} <= set(error) and "\n" not in error["message"]
    return error


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(DEMO_MODELS, http_port=free_port()) as srv:
        yield srv


@pytest.fixture(scope="module")
def grpc_client(server: ServerThread) -> Iterator[Client]:
    with Client(server.target) as c:
        yield c


@pytest.fixture(scope="module")
def oai(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def text_only(tmp_path: Path) -> Path:
    (tmp_path / f"{TEXT_MODEL}.onnx").symlink_to(DEMO_MODELS / f"{TEXT_MODEL}.onnx")
    return tmp_path


# ---- the OpenAI client ----------------------------------------------------------------------------------------


def test_openai_client_float_and_base64_equal_grpc(oai: openai.OpenAI, grpc_client: Client) -> None:
    expected = np.stack(grpc_client.embed(TEXTS, TEXT_MODEL, normalize=True))
    for fmt in ("float", "base64"):
        reply = oai.embeddings.create(model=TEXT_MODEL, input=TEXTS, encoding_format=fmt)
        rows = [d.embedding for d in sorted(reply.data, key=lambda d: d.index)]
        if fmt == "base64":  # asked for explicitly, the client hands the strings over as they came
            rows = [np.frombuffer(base64.b64decode(row), "<f4") for row in rows]
        got = np.array(rows, np.float32)
        assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-6, fmt
        assert reply.model == TEXT_MODEL and reply.usage.prompt_tokens == reply.usage.total_tokens > len(TEXTS)
    default = oai.embeddings.create(model=TEXT_MODEL, input=TEXTS[0])  # the client asks for base64 by itself
    np.testing.assert_allclose(default.data[0].embedding, expected[0], atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(expected, axis=1), 1.0, atol=1e-5)  # L2-normalised by default
    same = oai.embeddings.create(model=TEXT_MODEL, input=TEXTS[:1], dimensions=64, user="someone")
    np.testing.assert_allclose(same.data[0].embedding, expected[0], atol=1e-6, rtol=0)


def test_openai_client_errors(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="no-such-model"):
        oai.embeddings.create(model="no-such-model", input="hi")
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        oai.embeddings.create(model=TEXT_MODEL, input="hi", dimensions=8)
    with pytest.raises(openai.BadRequestError, match="token-id"):
        oai.embeddings.create(model=TEXT_MODEL, input=[[101, 2003, 102]])
    assert [m.id for m in oai.models.list()] == [AUDIO_MODEL, IMAGE_MODEL, TEXT_MODEL]
    assert oai.models.retrieve(TEXT_MODEL).id == TEXT_MODEL


def test_image_and_audio_data_uris(server: ServerThread, grpc_client: Client) -> None:
    png = encode_image(picture(48, 40, seed=3), "PNG")
    wav = encode_audio(tone(0.6, 16000, seed=1), 16000, "WAV")
    for model, data, uri in ((IMAGE_MODEL, png, f"data:image/png;base64,{b64(png)}"),
                             (AUDIO_MODEL, wav, f"data:audio/wav;base64,{b64(wav)}")):
        expected = grpc_client.embed(data, model, normalize=True)
        status, _, body = call(f"{server.http_url}/v1/embeddings", {"model": model, "input": [uri, uri]})
        assert status == 200, body
        for item in body["data"]:
            np.testing.assert_allclose(item["embedding"], expected, atol=1e-6, rtol=0)
        assert body["usage"]["prompt_tokens"] > 0
        # without a model name, the data URI's type picks the model
        status, _, body = call(f"{server.http_url}/v1/embeddings", {"input": uri, "encoding_format": "base64"})
        assert status == 200 and body["model"] == model
        np.testing.assert_allclose(np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), "<f4"), expected,
                                   atol=1e-6, rtol=0)
    error = error_of(400, call(f"{server.http_url}/v1/embeddings", {"model": IMAGE_MODEL, "input": ["plain text"]}))
    assert "data:image" in error["message"] and error["input_index"] == 0


# ---- the native /v1/embed -------------------------------------------------------------------------------------


def test_native_embed_mirrors_grpc(server: ServerThread, grpc_client: Client) -> None:
    png = encode_image(picture(32, 32), "PNG")
    wav = encode_audio(tone(0.5), 16000, "FLAC")
    samples = (tone(0.4, 8000) * 32767).astype("<i2")
    cases = [
        (TEXT_MODEL, {"text": TEXTS[1]}, TEXTS[1]),
        (IMAGE_MODEL, {"image": b64(png)}, png),
        (AUDIO_MODEL, {"audio": b64(wav)}, wav),
    ]
    for model, item, raw in cases:
        for options in ({"pooling": "none"}, {"representation": "target", "pooling": "none", "normalize": True},
                        {"pooling": "cls", "dtype": "float16"}):
            expected = grpc_client.embed(raw, model, **options)
            for data_format in ("list", "base64"):
                status, _, body = call(f"{server.http_url}/v1/embed", {
                    "model": model, "inputs": [item], "options": options, "data_format": data_format,
                    "request_id": "r-1"})
                assert status == 200, body
                tensor = body["embeddings"][0]["tensor"]
                dtype = np.dtype("<f2" if options.get("dtype") == "float16" else "<f4")
                assert tensor["dtype"] == dtype.name and tensor["shape"] == list(expected.shape)
                if data_format == "base64":
                    got = np.frombuffer(base64.b64decode(tensor["data"]), dtype).reshape(tensor["shape"])
                else:
                    got = np.asarray(tensor["data"], dtype)
                np.testing.assert_array_equal(got, expected)
                assert body["request_id"] == "r-1" and body["model"] == model
                assert body["embeddings"][0]["positions"] > 0 and body["timings"]["total_ms"] > 0
    pcm = {"data": b64(samples.tobytes()), "encoding": "int16", "sample_rate": 8000}
    status, _, body = call(f"{server.http_url}/v1/embed", {"inputs": [{"pcm": pcm}], "data_format": "base64"})
    from d2v_serve.client import Pcm

    expected = grpc_client.embed(Pcm(samples, 8000), AUDIO_MODEL)
    assert status == 200 and body["model"] == AUDIO_MODEL
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(body["embeddings"][0]["tensor"]["data"]), "<f4"),
                                  expected)
    assert body["usage"]["audio_seconds"] == pytest.approx(0.4, abs=0.01)


# ---- status mapping -------------------------------------------------------------------------------------------


def test_request_errors_map_to_statuses(server: ServerThread) -> None:
    url = server.http_url
    error = error_of(400, call(f"{url}/v1/embed", {"model": AUDIO_MODEL, "inputs": [
        {"audio": b64(encode_audio(tone(0.3), 16000, "WAV"))}, {"audio": b64(b"RIFF\x00\x00\x00\x00WAVEjunk")}]}))
    assert error["input_index"] == 1 and error["param"] == "input" and error["message"].startswith("input 1: ")
    assert error["code"] == "invalid_argument" and error["type"] == "invalid_request_error"
    error = error_of(400, call(f"{url}/v1/embed", {"inputs": [{"text": "a"}, {"image": "not base64!"}]}))
    assert error["input_index"] == 1 and "base64" in error["message"]
    assert error_of(400, call(f"{url}/v1/embed", {"model": TEXT_MODEL, "inputs": [{}]}))["message"] == \
        "input 0: empty input (set one of audio, pcm, image, text)"
    error = error_of(400, call(f"{url}/v1/embed", {"inputs": [{"text": "a", "image": b64(b"x")}]}))
    assert "exactly one" in error["message"] and error["input_index"] == 0
    error = error_of(400, call(f"{url}/v1/embed", {"inputs": [{"text": "a"}], "options": {"pooling": "max"}}))
    assert error["message"].startswith("options.pooling: ")
    error = error_of(400, call(f"{url}/v1/embed", {"inputs": [{"text": "a"}, {"text": 5}]}))
    assert error["input_index"] == 1 and error["message"].startswith("inputs.1.text: ")
    assert "JSON" in error_of(400, call(f"{url}/v1/embeddings", raw=b"{not json"))["message"]
    assert "JSON" in error_of(400, call(f"{url}/v1/embeddings", raw=b"model=x",
                                        headers={"Content-Type": "application/x-www-form-urlencoded"}))["message"]
    assert error_of(400, call(f"{url}/v1/embeddings", {"model": TEXT_MODEL, "input": []}))["message"] == \
        "request has no inputs"
    error = error_of(400, call(f"{url}/v1/embeddings", {"model": TEXT_MODEL, "input": "x " * 500}))
    assert "truncate" in error["message"]
    error = error_of(400, call(f"{url}/v1/embeddings", {"model": TEXT_MODEL, "input": "x", "encoding_format": "hex"}))
    assert error["message"].startswith("encoding_format: ")
    error = error_of(400, call(f"{url}/v1/embed", {"inputs": [{"text": "a"}]},
                               headers={"X-D2V-Timeout-S": "soon"}))
    assert "x-d2v-timeout-s" in error["message"]

    error = error_of(404, call(f"{url}/v1/embed", {"model": "nope", "inputs": [{"text": "a"}]}))
    assert error["code"] == "not_found" and "nope" in error["message"]
    assert error_of(404, call(f"{url}/v1/models/nope"))["code"] == "not_found"
    assert error_of(404, call(f"{url}/v2/anything"))["message"] == "no route /v2/anything"
    assert error_of(405, call(f"{url}/v1/embeddings"))["code"] == "unimplemented"

    error = error_of(422, call(f"{url}/v1/embed", {"model": AUDIO_MODEL, "inputs": [{"text": "words"}]}))
    assert error["code"] == "failed_precondition" and error["input_index"] == 0 and "takes audio" in error["message"]


def test_body_limit_is_413(text_only: Path) -> None:
    with ServerThread(text_only, http_port=free_port(), max_message_mb=1) as srv:
        # the server answers as soon as it sees the declared length, before the body: send none and read the answer
        connection = http.client.HTTPConnection("127.0.0.1", srv.server.http_port, timeout=30)
        connection.putrequest("POST", "/v1/embeddings")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(2**20 + 1))
        connection.endheaders()
        response = connection.getresponse()
        body = json.loads(response.read())
        connection.close()
        assert response.status == 413 and body["error"]["code"] == "resource_exhausted"
        assert "1 MiB" in body["error"]["message"]
        # without a length (chunked), the server stops at the limit as the body streams in
        def chunks() -> Iterator[bytes]:
            yield b'{"model": "demo-text", "input": "'
            yield from (b"x" * 200_000 for _ in range(8))
            yield b'"}'

        connection = http.client.HTTPConnection("127.0.0.1", srv.server.http_port, timeout=30)
        connection.request("POST", "/v1/embeddings", body=chunks(), headers={"Content-Type": "application/json"},
                           encode_chunked=True)
        response = connection.getresponse()
        assert response.status == 413 and "1 MiB" in json.loads(response.read())["error"]["message"]
        connection.close()
        near = {"model": TEXT_MODEL, "input": ["word " * 10] * 10, "user": "x" * (2**20 - 2000)}  # just under
        assert call(f"{srv.http_url}/v1/embeddings", near)[0] == 200


def _gate_model(srv: ServerThread, name: str) -> threading.Event:
    """Make the model's runs wait for the returned event (warm-up is over)."""
    runner = srv.server.models[name].runner
    original, gate = runner.run, threading.Event()

    def gated(feeds: dict, outputs: list) -> dict:
        gate.wait(30)
        return original(feeds, outputs)

    runner.run = gated
    return gate


def test_full_queue_is_429_and_deadline_504(text_only: Path) -> None:
    with ServerThread(text_only, http_port=free_port(), max_queue=4, max_request_inputs=4) as srv, \
            concurrent.futures.ThreadPoolExecutor(3) as pool:
        url = f"{srv.http_url}/v1/embeddings"
        gate = _gate_model(srv, TEXT_MODEL)
        batcher = srv.server.models[TEXT_MODEL].batcher
        alike = ["four texts of one length"] * 4  # no padding: the batcher takes them in one batch
        running = pool.submit(call, url, {"model": TEXT_MODEL, "input": alike})  # held in the model run
        time.sleep(0.3)
        queued = pool.submit(call, url, {"model": TEXT_MODEL, "input": alike})  # fills the queue behind it
        deadline = time.monotonic() + 10
        while batcher.depth < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert batcher.depth == 4, "the second call should wait in the queue"
        status, headers, body = call(url, {"model": TEXT_MODEL, "input": "one more"})
        assert status == 429 and headers["retry-after"] == "1" and body["error"]["type"] == "rate_limit_error"
        gate.set()
        assert running.result(30)[0] == 200 and queued.result(30)[0] == 200

        gate.clear()
        held = pool.submit(call, url, {"model": TEXT_MODEL, "input": "held at the model"})
        time.sleep(0.2)
        status, _, body = call(url, {"model": TEXT_MODEL, "input": "in a hurry"}, headers={"X-D2V-Timeout-S": "0.3"})
        assert status == 504 and body["error"]["code"] == "deadline_exceeded" and "0.3 s" in body["error"]["message"]
        gate.set()
        assert held.result(30)[0] == 200


def test_model_failure_is_500(text_only: Path) -> None:
    with ServerThread(text_only, http_port=free_port()) as srv:
        runner = srv.server.models[TEXT_MODEL].runner

        def broken(feeds: dict, outputs: list) -> dict:
            raise RuntimeError("kernel failure")

        runner.run = broken
        error = error_of(500, call(f"{srv.http_url}/v1/embeddings", {"model": TEXT_MODEL, "input": "x"}))
        assert error["code"] == "internal" and error["type"] == "server_error"


def test_health_and_draining(text_only: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = hold_batchers(monkeypatch)
    srv = ServerThread(text_only, http_port=free_port())
    srv._thread.start()
    import asyncio

    starting = asyncio.run_coroutine_threadsafe(srv.server.start(), srv.loop)
    deadline = time.monotonic() + 30
    while True:  # the port opens before the warm-up ends
        try:
            status, _, body = call(f"{srv.http_url}/health")
            break
        except (urllib.error.URLError, ConnectionError):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    try:
        assert (status, body) == (503, {"status": "NOT_SERVING"})
        error = error_of(503, call(f"{srv.http_url}/v1/embeddings", {"input": "too early"}))
        assert "warming up" in error["message"] and error["type"] == "server_error"
        release.set()
        starting.result(30)
        assert call(f"{srv.http_url}/health")[:3:2] == (200, {"status": "SERVING"})
        assert call(f"{srv.http_url}/v1/embeddings", {"input": "now"})[0] == 200

        srv.call(srv.server._mark_down(TEXT_MODEL))  # what a dead worker does
        assert call(f"{srv.http_url}/health")[0] == 503
        srv.server.core.drain.begin()
        status, headers, body = call(f"{srv.http_url}/v1/embeddings", {"input": "after"})
        assert status == 503 and headers["retry-after"] == "1" and "shutting down" in body["error"]["message"]
    finally:
        release.set()
        srv.stop()


# ---- auth, TLS ------------------------------------------------------------------------------------------------


def test_bearer_token_auth(text_only: Path) -> None:
    with ServerThread(text_only, http_port=free_port(), auth_token="s3cret") as srv:
        url = f"{srv.http_url}/v1"
        for key in ("wrong", ""):
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=url, api_key=key or "x", max_retries=0).embeddings.create(
                    model=TEXT_MODEL, input="hi")
        status, headers, body = call(f"{url}/embed", {"inputs": [{"text": "hi"}]})
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        assert body["error"] == {"message": "missing or invalid bearer token (Authorization: Bearer ...)",
                                 "type": "authentication_error", "param": None, "code": "unauthenticated",
                                 "input_index": None}
        assert call(f"{url}/models")[0] == 401
        assert call(f"{srv.http_url}/health")[0] == 200  # exempt, as gRPC health is
        assert call(f"{srv.http_url}/metrics")[0] == 200
        client = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0)
        assert len(client.embeddings.create(model=TEXT_MODEL, input=["a", "b"]).data) == 2
        assert call(f"{url}/embed", {"inputs": [{"text": "hi"}]}, headers={"Authorization": "Bearer s3cret"})[0] == 200
    with ServerThread(text_only, http_port=free_port()) as srv:  # auth off: any key (or none) will do
        assert call(f"{srv.http_url}/v1/embed", {"inputs": [{"text": "hi"}]},
                    headers={"Authorization": "Bearer anything"})[0] == 200


def test_tls_with_the_grpc_certificates(text_only: Path, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "IP:127.0.0.1")
    with ServerThread(text_only, http_port=free_port(), tls_cert=str(cert), tls_key=str(key)) as srv:
        assert srv.http_url.startswith("https://")
        trusted = ssl.create_default_context(cafile=str(cert))
        status, _, body = call(f"{srv.http_url}/v1/embed", {"inputs": [{"text": "hi"}]}, context=trusted)
        assert status == 200 and body["model"] == TEXT_MODEL
        with Client(srv.target, root_certificates=cert.read_bytes()) as grpc_tls:  # the same files serve gRPC
            assert grpc_tls.health() == "SERVING"
        with pytest.raises(urllib.error.URLError):
            call(f"{srv.http_url}/health", context=ssl.create_default_context())  # not a trusted certificate
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            call(f"http://127.0.0.1:{srv.server.http_port}/health")  # plaintext to the TLS port
    with ServerThread(text_only, http_port=free_port(), tls_cert=str(cert), tls_key=str(key),
                      tls_client_ca=str(cert)) as srv:  # mTLS: the client's certificate is checked too
        anonymous = ssl.create_default_context(cafile=str(cert))
        with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
            call(f"{srv.http_url}/health", context=anonymous)
        known = ssl.create_default_context(cafile=str(cert))
        known.load_cert_chain(str(cert), str(key))
        assert call(f"{srv.http_url}/health", context=known)[0] == 200


# ---- models, metrics, OpenAPI ---------------------------------------------------------------------------------


def test_models_metrics_and_openapi(server: ServerThread, grpc_client: Client) -> None:
    status, _, body = call(f"{server.http_url}/v1/models")
    assert status == 200 and body["object"] == "list"
    cards = {card["id"]: card for card in body["data"]}
    assert set(cards) == {AUDIO_MODEL, IMAGE_MODEL, TEXT_MODEL}
    described = grpc_client.describe_model(TEXT_MODEL)
    info = cards[TEXT_MODEL]["d2v"]
    assert info["hidden_size"] == described["hidden_size"] and info["max_tokens"] == described["max_tokens"]
    assert info["modality"] == "text" and info["metadata"]["format"] == "d2v-onnx"
    assert call(f"{server.http_url}/v1/models/{IMAGE_MODEL}")[2]["d2v"]["image_size"] > 0

    call(f"{server.http_url}/v1/embeddings", {"model": TEXT_MODEL, "input": "counted"})
    status, _, text = call(f"{server.http_url}/metrics")
    assert status == 200 and 'd2v_requests_total{code="OK",method="/v1/embeddings"}' in text

    status, _, spec = call(f"{server.http_url}/openapi.json")
    assert status == 200 and {"/v1/embeddings", "/v1/embed", "/v1/models", "/health"} <= set(spec["paths"])
    request_schema = spec["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert request_schema["$ref"].endswith("/EmbeddingsRequest")
    assert "429" in spec["paths"]["/v1/embeddings"]["post"]["responses"]
    status, _, page = call(f"{server.http_url}/docs")
    assert status == 200 and "swagger" in page.lower()
