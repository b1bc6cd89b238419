"""Compact vectors: the quantisation rules, and int8 / uint8 / binary / ubinary over gRPC and HTTP equal to the
rule applied to the server's own float32 vectors."""

from __future__ import annotations

import base64
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from d2v_serve.cli import DEMO_MODELS
from d2v_serve.client import Client, EmbedError
from d2v_serve.core.postprocess import COMPACT, quantize
from tests.serve_fixtures import ServerThread, free_port

TEXTS = ["a cold wind blew across the harbour", "heavy rain is expected", "the river valley at dawn"]


def test_int8_scales_each_vector_to_127_and_rounds() -> None:
    v = np.array([[0.5, -0.25, 0.125, 0.0], [-2.0, 1.0, 0.01, 0.5]], np.float32)
    assert quantize(v, "int8").tolist() == [[127, -64, 32, 0], [-127, 64, 1, 32]]  # 63.5 rounds to even: 64
    assert quantize(v, "uint8").tolist() == [[255, 64, 160, 128], [1, 192, 129, 160]]
    assert quantize(v, "int8").dtype == np.int8 and quantize(v, "uint8").dtype == np.uint8
    assert quantize(np.zeros((1, 4), np.float32), "int8").tolist() == [[0, 0, 0, 0]]  # no division by zero


def test_binary_packs_sign_bits_high_bit_first() -> None:
    v = np.array([[1, -1, 1, 1, -1, -1, -1, 1, 0.5, -0.5]], np.float32)  # 10 dimensions: 2 bytes, 6 pad bits
    assert quantize(v, "ubinary").tolist() == [[0b10110001, 0b10000000]]
    assert quantize(v, "binary").tolist() == [[0b10110001 - 128, 0]]
    assert quantize(v, "binary").dtype == np.int8 and quantize(v, "ubinary").dtype == np.uint8
    assert quantize(np.zeros((1, 8), np.float32), "ubinary").tolist() == [[0]]  # 0 is not > 0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    models = tmp_path_factory.mktemp("models")
    (models / "demo-text.onnx").symlink_to(DEMO_MODELS / "demo-text.onnx")
    with ServerThread(Path(models), http_port=free_port()) as srv:
        yield srv


@pytest.mark.parametrize("dtype", COMPACT)
def test_grpc_compact_vectors_follow_the_rule(server, dtype: str) -> None:
    with Client(server.target) as c:
        reference = np.stack(c.embed(TEXTS, "demo-text", normalize=True))
        got = np.stack(c.embed(TEXTS, "demo-text", normalize=True, dtype=dtype))
        cls = np.stack(c.embed(TEXTS, "demo-text", pooling="cls", dtype=dtype))
        cls_reference = np.stack(c.embed(TEXTS, "demo-text", pooling="cls"))
    assert got.dtype == quantize(reference, dtype).dtype
    # the server quantises its float32 vector; the client's copy went through float32 too: equal, or one step off
    # where a value sits on a rounding edge
    assert np.abs(got.astype(np.int16) - quantize(reference, dtype).astype(np.int16)).max() <= 1
    if dtype in ("binary", "ubinary"):
        assert got.shape == (len(TEXTS), 64 // 8)
        np.testing.assert_array_equal(got, quantize(reference, dtype))
    assert np.abs(cls.astype(np.int16) - quantize(cls_reference, dtype).astype(np.int16)).max() <= 1


def test_compact_dtypes_are_for_pooled_vectors(server) -> None:
    with Client(server.target) as c, pytest.raises(EmbedError) as info:
        c.embed(TEXTS[0], "demo-text", pooling="none", dtype="int8")
    assert info.value.code.name == "INVALID_ARGUMENT" and "pooled vectors" in info.value.message


def _post(server, route: str, body: dict) -> dict:
    request = urllib.request.Request(f"{server.http_url}{route}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.parametrize("dtype", COMPACT)
def test_http_compact_vectors_equal_grpc(server, dtype: str) -> None:
    with Client(server.target) as c:
        expected = np.stack(c.embed(TEXTS, "demo-text", normalize=True, dtype=dtype))
    openai = _post(server, "/v1/embeddings", {"model": "demo-text", "input": TEXTS, "encoding_format": dtype})
    np.testing.assert_array_equal(np.array([d["embedding"] for d in openai["data"]]), expected)
    native = _post(server, "/v1/embed", {"model": "demo-text", "inputs": [{"text": t} for t in TEXTS],
                                         "options": {"normalize": True, "dtype": dtype}, "data_format": "base64"})
    for tensor, row in zip((e["tensor"] for e in native["embeddings"]), expected, strict=True):
        assert tensor["dtype"] == dtype and tensor["shape"] == list(row.shape)
        np.testing.assert_array_equal(np.frombuffer(base64.b64decode(tensor["data"]), row.dtype), row)
