"""The bundled demo models (what `d2v-serve` with no --models serves): valid d2v model files, one per modality, that
embed real inputs over gRPC, keep every item's result independent of its batch, and did not collapse in training."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from d2v_serve.cli import DEMO_MODELS
from d2v_serve.client import Audio, Client
from d2v_serve.client import Image as ImageInput
from d2v_serve.models.model_file import read_metadata
from tests.serve_fixtures import ServerThread, encode_image

SENTENCES = ["The ferry leaves the harbour at dawn.", "A violin is tuned before the concert.",
             "Snow covered the quiet village overnight.", "She fixed the bicycle chain with a spanner."]


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    with ServerThread(DEMO_MODELS) as srv, Client(srv.target) as c:
        yield c


def _spoken(text: str, tmp: Path, voice: str = "en-us") -> bytes:
    wav = tmp / f"{abs(hash((text, voice)))}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(wav), text], check=True, capture_output=True, timeout=60)
    return wav.read_bytes()


def _shape(kind: str, size: int, color: str) -> bytes:
    img = Image.new("RGB", (96, 96), "white")
    draw = ImageDraw.Draw(img)
    box = (48 - size // 2, 48 - size // 2, 48 + size // 2, 48 + size // 2)
    {"circle": draw.ellipse, "square": draw.rectangle}[kind](box, fill=color)
    return encode_image(img, "PNG")


def _assert_distinct_and_batch_invariant(client: Client, inputs: list, model: str) -> None:
    together = np.stack(client.embed(inputs, model, normalize=True))
    alone = np.stack([client.embed(x, model, normalize=True) for x in inputs])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert np.isfinite(together).all() and together.shape == (len(inputs), 64)
    cosines = together @ together.T
    off_diagonal = cosines[~np.eye(len(inputs), dtype=bool)]
    assert off_diagonal.max() < 0.999, f"{model}: different inputs give the same vector (collapsed)"


def test_one_valid_model_file_per_modality() -> None:
    files = sorted(DEMO_MODELS.glob("*.onnx"))
    assert [f.name for f in files] == ["demo-audio.onnx", "demo-image.onnx", "demo-text.onnx"]
    for f in files:
        meta = read_metadata(f)
        assert f.stem == f"demo-{meta.modality}" and meta.precision == "fp32"
        assert f.stat().st_size < 4 * 2**20


def test_lists_the_three_demo_models(client: Client) -> None:
    assert sorted(m["name"] for m in client.list_models()) == ["demo-audio", "demo-image", "demo-text"]


def test_demo_text(client: Client) -> None:
    _assert_distinct_and_batch_invariant(client, SENTENCES, "demo-text")


def test_demo_image(client: Client) -> None:
    pictures = [ImageInput(_shape(k, s, c)) for k, s, c in
                [("circle", 60, "red"), ("square", 60, "blue"), ("circle", 30, "green"), ("square", 40, "black")]]
    _assert_distinct_and_batch_invariant(client, pictures, "demo-image")


def test_demo_audio(client: Client, tmp_path: Path) -> None:
    clips = [Audio(_spoken(s, tmp_path, v)) for s, v in zip(SENTENCES, ["en-us", "en-gb", "en-us", "en-gb"],
                                                              strict=True)]
    _assert_distinct_and_batch_invariant(client, clips, "demo-audio")
