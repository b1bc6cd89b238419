"""A served model's facts, as every transport reports them (gRPC ModelInfo, HTTP model cards)."""

from __future__ import annotations

from dataclasses import dataclass

from ..models.model_file import REPRESENTATIONS
from ..models.registry import Model


@dataclass(slots=True)
class ModelInfo:
    name: str
    modality: str  # audio | image | text
    hidden_size: int
    num_layers: int
    precision: str  # fp32 | fp16 | int8
    representations: list[str]  # of REPRESENTATIONS' keys: last, target
    execution_provider: str
    ready: bool
    file: str
    metadata_json: str  # the model file's d2v metadata without the tokenizer text
    created: int  # the model file's modification time (Unix seconds)
    file_sha256: str  # of the file as loaded
    loaded_at: float  # when this server loaded it (Unix seconds)
    max_tokens: int = 0  # text
    max_audio_seconds: float = 0.0  # audio
    sample_rate: int = 0  # audio
    image_size: int = 0  # image
    chunk_window: float = 0.0  # chunking defaults: audio seconds, text tokens
    chunk_overlap: float = 0.0
    max_chunked_audio_seconds: float = 0.0
    max_chunked_tokens: int = 0


def describe(model: Model) -> ModelInfo:
    meta = model.meta
    info = ModelInfo(
        name=model.name, modality=model.modality, hidden_size=meta.hidden_size, num_layers=meta.num_layers,
        precision=meta.precision, representations=[k for k in REPRESENTATIONS if k in model.outputs],
        execution_provider=model.runner.provider, ready=model.ready, file=model.path.name,
        metadata_json=model.public_metadata, created=int(model.path.stat().st_mtime),
        file_sha256=model.sha256, loaded_at=model.loaded_at,
    )
    if model.chunk is not None:
        info.chunk_window, info.chunk_overlap = model.chunk.window, model.chunk.overlap
    if model.modality == "text":
        info.max_tokens = model.max_tokens
        info.max_chunked_tokens = model.chunk.max_tokens
    elif model.modality == "audio":
        info.max_chunked_audio_seconds = model.chunk.max_seconds
        info.max_audio_seconds = model.max_samples / model.sample_rate
        info.sample_rate = model.sample_rate
    else:
        info.image_size = model.image_size
    return info
