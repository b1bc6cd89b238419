"""Serving test helpers: real tiny d2v model files with their torch twins, encoded media made on the fly, and an
in-process server on loopback."""

from __future__ import annotations

import asyncio
import io
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from PIL import Image

from d2v_serve.config import ServerConfig
from d2v_serve.models.model_file import read_metadata
from d2v_serve.preprocess import Preprocessing, preprocessing_from_dict
from d2v_serve.server import Server

OUTPUTS = ["last_hidden_state", "target_hidden_state", "output_mask"]
INPUTS = {"audio": ["input_values", "attention_mask"], "image": ["pixel_values"],
          "text": ["input_ids", "attention_mask"]}


# ---- model files --------------------------------------------------------------------------------------------


@dataclass
class TinyModel:
    """A model file made by the real exporter from a tiny random checkpoint, with the torch module it came from."""

    path: Path
    modality: str
    meta: dict[str, Any]
    preprocessing: Preprocessing
    torch_model: torch.nn.Module

    def torch_outputs(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            outs = self.torch_model(*(torch.from_numpy(feeds[n]) for n in INPUTS[self.modality]))
        return {name: o.numpy() for name, o in zip(OUTPUTS, outs, strict=True)}


def make_tiny_model(modality: str, directory: Path, precision: str = "fp32") -> TinyModel:
    """tests.factories.make_model_file (tiny checkpoint -> d2v-export), and the exporter's torch graph module of the
    same checkpoint as the reference."""
    from d2v.export.graph import graph_module
    from d2v.training.checkpoint import encoder_config, load_encoder
    from tests.factories import make_model_file, tiny_checkpoint

    path = make_model_file(modality, directory, precision)
    meta = read_metadata(path)
    ckpt = tiny_checkpoint(modality)
    reference = graph_module(load_encoder(ckpt), encoder_config(ckpt))
    return TinyModel(path, modality, meta, preprocessing_from_dict(modality, meta.preprocessing), reference)


# ---- media made on the fly ----------------------------------------------------------------------------------


def tone(seconds: float, rate: int = 16000, freq: float = 440.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).standard_normal(t.size) * 0.05
    return (0.5 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def encode_audio(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    """WAV (PCM16), FLAC or OGG/Vorbis bytes."""
    buf = io.BytesIO()
    subtype = {"WAV": "PCM_16", "FLAC": "PCM_16", "OGG": "VORBIS"}[fmt]
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * np.ones((height, 1, 3), np.float32)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8))


def encode_image(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


# ---- an in-process server on loopback, in its own thread and event loop ------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """Runs d2v_serve.server.Server in a background event loop; `port` once started."""

    def __init__(self, models_dir: Path, **overrides: Any) -> None:
        settings = {"port": 0, "host": "127.0.0.1", "http_port": 0, "metrics_port": 0, "max_delay_ms": 2.0,
                    **overrides}
        self.config = ServerConfig(**settings)
        self.config.validate()
        self.server = Server(self.config, models_dir)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self.call(self.server.start(), timeout=120)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def http_url(self) -> str:
        scheme = "https" if self.config.tls_cert else "http"
        return f"{scheme}://127.0.0.1:{self.server.http_port}"

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 5.0) -> None:
        if self._thread.is_alive():
            self.call(self.server.stop(grace), timeout=grace + 30)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


def hold_batchers(monkeypatch: Any) -> threading.Event:
    """Keep every batcher that starts from now on in its warming state until the returned event is set."""
    from d2v_serve.core import batcher as batcher_module

    release = threading.Event()
    original_main = batcher_module.Batcher._main

    def gated_main(self: batcher_module.Batcher) -> None:
        release.wait(30)
        original_main(self)

    monkeypatch.setattr(batcher_module.Batcher, "_main", gated_main)
    return release


def self_signed(directory: Path, subject_alt_name: str = "DNS:d2v.test") -> tuple[Path, Path]:
    """A throwaway EC certificate and key (openssl) for TLS tests: (cert.pem, key.pem) in `directory`."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "1", "-subj", "/CN=d2v-test", "-addext", f"subjectAltName={subject_alt_name}",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key
