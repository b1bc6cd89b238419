"""Serving test helpers: tiny d2v model files, encoded media made on the fly, an in-process server on loopback.

The model files come from tiny torch modules with the contract's graph names and metadata (a stand-in until the
real exporter and `tests.factories.make_model_file` exist); the torch module is kept as the reference.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import threading
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from PIL import Image
from torch import nn

from d2v_serve.config import ServerConfig
from d2v_serve.preprocess import AudioPreprocessing, ImagePreprocessing, train_bpe_tokenizer
from d2v_serve.server import Server

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "data2vec learns contextualized representations of speech, images and text",
    "a server batches requests of different lengths without padding them to the longest",
    "hello world", "numbers 0123456789 and punctuation !?.,;:", "zebras and quokkas are animals",
]
CONV_LAYERS = [[16, 10, 5], [16, 4, 4], [16, 4, 4], [16, 2, 2], [16, 2, 2]]  # 50 frames/s, like data2vec
TEXT_MAX = 64
IMAGE_SIZE = 32
OUTPUTS = ["last_hidden_state", "target_hidden_state", "output_mask"]
INPUTS = {"audio": ["input_values", "attention_mask"], "image": ["pixel_values"],
          "text": ["input_ids", "attention_mask"]}


# ---- tiny torch encoders with the contract's inputs and outputs ---------------------------------------------


class Block(nn.Module):
    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        scores = scores.masked_fill(~valid[:, None, None, :], -1e9)
        x = x + self.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class TinyEncoder(nn.Module):
    def __init__(self, modality: str, dim: int = 16, layers: int = 3, target_layers: int = 2, vocab: int = 300):
        super().__init__()
        self.modality, self.target_layers, self.dim = modality, target_layers, dim
        if modality == "audio":
            convs, channels = [], 1
            for d, k, s in CONV_LAYERS:
                convs += [nn.Conv1d(channels, d, k, s), nn.GELU()]
                channels = d
            self.front = nn.Sequential(*convs)
            self.proj = nn.Linear(channels, dim)
        elif modality == "image":
            self.front = nn.Conv2d(3, dim, 8, 8)
            self.cls = nn.Parameter(torch.randn(1, 1, dim))
            self.pos = nn.Parameter(torch.randn(1, 1 + (IMAGE_SIZE // 8) ** 2, dim) * 0.1)
        else:
            self.front = nn.Embedding(vocab, dim)
            self.pos = nn.Embedding(TEXT_MAX + 2, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def embed(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.modality == "audio":
            values, mask = inputs
            x = self.proj(self.front(values[:, None, :]).transpose(1, 2))
            frames = mask.sum(1)
            for _dim, kernel, stride in CONV_LAYERS:
                frames = torch.div(frames - kernel, stride, rounding_mode="floor") + 1
            valid = torch.arange(x.shape[1])[None, :] < frames[:, None]
        elif self.modality == "image":
            x = self.front(inputs[0]).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
            valid = torch.ones(x.shape[:2], dtype=torch.bool)
        else:
            ids, mask = inputs
            x = self.front(ids) + self.pos(torch.arange(ids.shape[1]))[None]
            valid = mask.bool()
        return x, valid

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, valid = self.embed(*inputs)
        layers = []
        for block in self.blocks:
            x = block(x, valid)
            layers.append(x)
        target = torch.stack([nn.functional.layer_norm(h, (self.dim,)) for h in layers[-self.target_layers:]])
        return self.norm(x), target.mean(0), valid.long()


# ---- model files --------------------------------------------------------------------------------------------


@dataclass
class TinyModel:
    path: Path
    modality: str
    torch_model: TinyEncoder
    preprocessing: Any

    def torch_outputs(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            outs = self.torch_model(*(torch.from_numpy(feeds[n]) for n in INPUTS[self.modality]))
        return {name: o.numpy() for name, o in zip(OUTPUTS, outs, strict=True)}


def _preprocessing(modality: str) -> Any:
    if modality == "audio":
        return AudioPreprocessing()
    if modality == "image":
        return ImagePreprocessing(image_size=IMAGE_SIZE, resize_size=IMAGE_SIZE)
    return replace(train_bpe_tokenizer(CORPUS, vocab_size=300, min_frequency=1), max_length=TEXT_MAX)


def _example(modality: str) -> tuple[torch.Tensor, ...]:
    if modality == "audio":
        return torch.randn(2, 4000), torch.ones(2, 4000, dtype=torch.long)
    if modality == "image":
        return (torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE),)
    return torch.randint(4, 200, (2, 12)), torch.ones(2, 12, dtype=torch.long)


def make_tiny_model(modality: str, directory: Path, name: str | None = None, seed: int = 0,
                    **meta_overrides: Any) -> TinyModel:
    """Export a tiny encoder to DIR/NAME.onnx with d2v metadata; returns it with its torch twin."""
    import onnx

    torch.manual_seed(seed)
    pre = _preprocessing(modality)
    model = TinyEncoder(modality, vocab=getattr(pre, "vocab_size", 300)).eval()
    path = Path(directory) / f"{name or modality}.onnx"
    dynamic = {n: {0: "batch", 1: "length"} for n in INPUTS[modality] if n != "pixel_values"}
    dynamic.update({"pixel_values": {0: "batch"}} if modality == "image" else {})
    dynamic.update({n: {0: "batch", 1: "positions"} for n in OUTPUTS})
    with warnings.catch_warnings():  # the legacy exporter is deprecated and warns about tracing
        warnings.simplefilter("ignore")
        torch.onnx.export(model, _example(modality), str(path), input_names=INPUTS[modality],
                          output_names=OUTPUTS, dynamic_axes=dynamic, opset_version=17, dynamo=False)
    proto = onnx.load(str(path))
    meta = {"format": "d2v-onnx", "format_version": 1, "modality": modality, "hidden_size": 16, "num_layers": 3,
            "num_heads": 2, "inputs": INPUTS[modality], "outputs": OUTPUTS, "precision": "fp32",
            "preprocessing": pre.to_dict(), "target_layers": 2,
            "source": {"checkpoint": "tiny-test", "checkpoint_sha256": "0" * 64}}
    meta.update({"audio": {"conv_layers": CONV_LAYERS}, "image": {"image_size": IMAGE_SIZE},
                 "text": {"max_positions": TEXT_MAX}}[modality])
    meta.update(meta_overrides)
    proto.metadata_props.add(key="d2v", value=json.dumps(meta))
    onnx.save(proto, str(path))
    return TinyModel(path, modality, model, pre)


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


class ServerThread:
    """Runs d2v_serve.server.Server in a background event loop; `port` once started."""

    def __init__(self, models_dir: Path, **overrides: Any) -> None:
        settings = {"port": 0, "host": "127.0.0.1", "metrics_port": 0, "max_delay_ms": 2.0, **overrides}
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

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 5.0) -> None:
        if self._thread.is_alive():
            self.call(self.server.stop(grace), timeout=grace + 30)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
