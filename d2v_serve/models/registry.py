"""The models a server runs: every *.onnx in a directory, named by file name, described by its d2v metadata."""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ..backend.runner import Runner, RuntimeSettings, cpu_cores, create_session, gpu_memory_bytes
from ..config import ServerConfig
from ..core.batcher import Batcher, BatchPolicy
from ..core.chunking import ChunkDefaults, audio_defaults, text_defaults
from ..preprocess import Preprocessing, audio_frames, max_text_chars, preprocessing_from_dict
from .model_file import OUTPUT_MASK, ModelFileError, ModelFileMeta, patch_size_from_positions, read_metadata

log = logging.getLogger(__name__)

@dataclass
class Model:
    name: str
    path: Path
    meta: ModelFileMeta
    preprocessing: Preprocessing
    runner: Runner
    policy: BatchPolicy
    max_tokens: int = 0  # text
    max_text_chars: int = 0  # text: checked before tokenizing
    max_samples: int = 0  # audio, at the model's rate
    max_audio_seconds: float = 0.0  # audio: checked from the header before decoding
    max_image_pixels: int = 0  # image: checked from the header before decoding
    batcher: Batcher | None = field(default=None, repr=False)
    sha256: str = ""  # of the file as loaded
    file_stamp: tuple[int, int] = (0, 0)  # its size and mtime (ns) then: a reload skips a file that still has them
    loaded_at: float = 0.0  # Unix seconds
    calls: int = 0  # calls in flight on this model (the event loop's count): a replaced model retires at 0
    chunk: ChunkDefaults | None = None  # audio and text: chunking defaults and limit

    @property
    def modality(self) -> str:
        return self.meta.modality

    @property
    def sample_rate(self) -> int:
        return int(getattr(self.preprocessing, "sample_rate", 0))

    @property
    def min_samples(self) -> int:
        """Audio: the fewest samples (at the model's rate) that give one output frame."""
        return self.meta.receptive_field

    @property
    def image_size(self) -> int:
        return int(getattr(self.preprocessing, "image_size", 0))

    @property
    def pad_id(self) -> int:
        return int(getattr(self.preprocessing, "pad_id", 1))

    @cached_property
    def outputs(self) -> dict[str, str]:
        """The representations this model file offers (and its graph has): name -> graph output."""
        return {k: v.output for k, v in self.meta.representations.items() if v.output in self.runner.output_names}

    @property
    def ready(self) -> bool:
        return self.batcher is not None and self.batcher.state == "ready"

    @cached_property
    def public_metadata(self) -> str:
        """The metadata as JSON without the tokenizer text (megabytes, and of no use to a client)."""
        return self.meta.public_json()

    @cached_property
    def image_positions(self) -> int:
        """Image: output positions per image, fixed by the graph (0 when its length axis is symbolic)."""
        shapes = {o.name: o.shape for o in self.runner.session.get_outputs()}
        length = shapes.get("output_mask", [None, None])[1]
        return length if isinstance(length, int) else 0

    def output_positions(self, value: np.ndarray) -> int:
        """Output positions of a prepared input: tokens, conv frames, or the image's patches (+ CLS)."""
        if self.modality == "text":
            return int(value.shape[0])
        if self.modality == "audio":
            return int(audio_frames(int(value.shape[0]), self.meta.conv_layers))
        return self.image_positions

    def cost(self, value: np.ndarray) -> int:
        """Batch cost units of a prepared input: tokens, samples or pixels."""
        return int(value.shape[-1] * value.shape[-2]) if self.modality == "image" else int(value.shape[0])

    def warmup_batches(self, max_batch_size: int) -> list[list[np.ndarray]]:
        """A few batch shapes run before serving: one input alone, a small batch, a longer input."""
        rng = np.random.default_rng(0)
        if self.modality == "text":
            vocab = max(8, min(1000, self.preprocessing.tokenizer.get_vocab_size()))
            def make(n: int) -> np.ndarray:
                ids = rng.integers(4, vocab, size=n)
                ids[0], ids[-1] = self.preprocessing.bos_id, self.preprocessing.eos_id
                return ids.astype(np.int64)
            lengths = [16, min(128, self.max_tokens)]
        elif self.modality == "audio":
            def make(n: int) -> np.ndarray:
                return rng.standard_normal(n).astype(np.float32)
            lengths = [self.sample_rate, min(8 * self.sample_rate, self.max_samples)]
        else:
            size = self.image_size
            def make(n: int) -> np.ndarray:
                return rng.standard_normal((3, size, size)).astype(np.float32)
            lengths = [1, 1]
        small = min(4, max_batch_size)
        return [[make(lengths[0])], [make(lengths[0]) for _ in range(small)], [make(lengths[1])]]


def file_sha256(path: Path) -> str:
    """The SHA-256 (hex) of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def start_worker(model: Model, config: ServerConfig,
                 on_death: Callable[[str, BaseException], None] | None = None) -> concurrent.futures.Future:
    """Give `model` its batcher and start it (warm-up batches first, unless --no-warmup); the future resolves
    when it is ready, or raises what the warm-up raised."""
    model.batcher = Batcher(model.name, model.modality, model.runner, model.policy, model.pad_id, on_death=on_death)
    return model.batcher.start(model.warmup_batches(config.max_batch_size) if config.warmup else [])


def model_files(directory: Path) -> list[Path]:
    """The *.onnx files of a directory, sorted; raises ModelFileError when there are none."""
    if not directory.is_dir():
        raise ModelFileError(f"model directory {directory} does not exist")
    files = sorted(p for p in directory.glob("*.onnx") if p.is_file())
    if not files:
        raise ModelFileError(f"no *.onnx model files in {directory}")
    return files


CPU_FILL_GFLOP = 40.0  # ~240 positions of a base model: beyond, batch 1 runs as fast per input as batch 32 on CPU


def units_per_position(meta: ModelFileMeta) -> int:
    """Batch cost units (tokens, audio samples, image pixels) per output position (token, frame, patch)."""
    if meta.modality == "audio":
        return meta.conv_stride
    if meta.modality == "image":
        return meta.patch_size**2
    return 1


def flop_per_position(hidden_size: int, num_layers: int) -> float:
    """The Transformer's multiply-adds x 2 per position, attention scores aside: 12 d^2 per layer."""
    return 24.0 * hidden_size**2 * (num_layers or 1)


def batch_policy(config: ServerConfig, meta: ModelFileMeta, preprocessing: Preprocessing, max_tokens: int,
                 on_cuda: bool) -> BatchPolicy:
    modality = meta.modality
    buckets = config.length_buckets if config.length_buckets >= 0 else (8 if on_cuda else 0)
    fill_gflop = config.batch_fill_gflop
    if fill_gflop < 0:
        fill_gflop = 0.0 if on_cuda else CPU_FILL_GFLOP
    unit = units_per_position(meta)
    fill = int(fill_gflop * 1e9 / flop_per_position(meta.hidden_size, meta.num_layers) * unit)
    common = dict(max_batch_size=config.max_batch_size, max_delay_s=config.max_delay_ms / 1000.0,
                  sort_window=config.sort_window, max_queue=config.max_queue, max_padding=config.max_padding,
                  fill=fill, attention_length=6 * meta.hidden_size * unit)
    if modality == "text":
        return BatchPolicy(budget=config.max_batch_tokens, length_buckets=buckets, max_length=max_tokens, **common)
    if modality == "audio":
        budget = int(config.max_batch_audio_seconds * preprocessing.sample_rate)
        return BatchPolicy(budget=budget, length_buckets=buckets, **common)
    return BatchPolicy(budget=config.max_batch_pixels, **common)


def runtime_settings(config: ServerConfig, sessions: int) -> RuntimeSettings:
    threads = config.intra_op_threads or max(1, cpu_cores() // max(1, sessions))
    limit = int(config.gpu_mem_limit_gb * 2**30)
    if not limit and config.device != "cpu":
        limit = int(0.9 * gpu_memory_bytes() / max(1, sessions))
    return RuntimeSettings(device=config.device, intra_op_threads=threads, gpu_mem_limit_bytes=limit)


def load_model(path: Path, config: ServerConfig, settings: RuntimeSettings, sha256: str = "") -> Model:
    """`sha256`: the file's, when the caller has read it already."""
    stat = path.stat()
    meta = read_metadata(path)
    modality = meta.modality
    try:
        preprocessing = preprocessing_from_dict(modality, meta.preprocessing)
    except ValueError as exc:
        raise ModelFileError(f"{path}: bad preprocessing metadata: {exc}") from None
    try:
        session = create_session(str(path), settings, prefer_cpu=meta.precision == "int8")
    except Exception as exc:  # noqa: BLE001 - ORT raises plain RuntimeError subclasses with long messages
        raise ModelFileError(f"{path}: onnxruntime cannot load it: {' '.join(str(exc).split())[:300]}") from None
    runner = Runner(session)
    if meta.precision == "fp16" and not runner.on_cuda:
        log.warning("fp16 model on CPU: it runs, but slower than its fp32 export", extra={"model_file": str(path)})
    missing = [n for n in meta.inputs if n not in runner.input_names]
    if missing or OUTPUT_MASK not in runner.output_names:
        raise ModelFileError(f"{path}: graph lacks {', '.join(missing) or OUTPUT_MASK}")
    if modality == "image" and not meta.patch_size:  # a version-1 file: its graph's fixed positions tell
        meta = meta.replace(patch_size=_graph_patch_size(path, meta, runner))
    limits: dict[str, Any] = {}
    max_tokens = 0
    if modality == "text":
        max_tokens = min(preprocessing.max_length, meta.max_positions or preprocessing.max_length)
        limits.update(max_tokens=max_tokens, max_text_chars=config.max_text_chars or max_text_chars(max_tokens))
    elif modality == "audio":
        limits.update(max_samples=int(config.max_audio_seconds * preprocessing.sample_rate),
                      max_audio_seconds=config.max_audio_seconds)
    else:
        limits.update(max_image_pixels=config.max_image_pixels)
    policy = batch_policy(config, meta, preprocessing, max_tokens, runner.on_cuda)
    model = Model(path.stem, path, meta, preprocessing, runner, policy, **limits, sha256=sha256 or file_sha256(path),
                  file_stamp=(stat.st_size, stat.st_mtime_ns), loaded_at=time.time())
    if modality == "text":
        model.chunk = text_defaults(max_tokens, config.max_chunked_tokens, config.max_text_chars)
    elif modality == "audio":
        model.chunk = audio_defaults(meta.training_crop_seconds, preprocessing.sample_rate, config.max_audio_seconds,
                                     config.max_chunked_audio_seconds)
    return model


def _graph_patch_size(path: Path, meta: ModelFileMeta, runner: Runner) -> int:
    shapes = {o.name: o.shape for o in runner.session.get_outputs()}
    positions = shapes.get(OUTPUT_MASK, [None, None])[1]
    patch = patch_size_from_positions(meta.image_size, positions) if isinstance(positions, int) else 0
    if not patch:
        raise ModelFileError(f"{path}: the image graph's {positions} output positions fit no patch grid of "
                             f"{meta.image_size} pixels (re-export the model)")
    return patch


def load_models(directory: str | Path, config: ServerConfig) -> dict[str, Model]:
    """Every model of `directory`, by name. Raises ModelFileError (one line) for the first bad file."""
    files = model_files(Path(directory))
    settings = runtime_settings(config, len(files))
    models = {}
    for path in files:
        model = load_model(path, config, settings)
        models[model.name] = model
        log.info("model loaded", extra={"model": model.name, "modality": model.modality,
                                        "provider": model.runner.provider, "precision": model.meta.precision,
                                        "threads": settings.intra_op_threads})
    return models
