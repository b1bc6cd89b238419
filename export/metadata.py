"""The model file describes itself: `d2v_serve.models.model_file.ModelFileMeta`, as JSON under key "d2v" in the ONNX
`metadata_props`."""

from __future__ import annotations

import hashlib
import json
from importlib import metadata as pkg_metadata
from pathlib import Path
from typing import Any

import onnx

from d2v.training.checkpoint import D2V_VERSION
from d2v.training.models import EncoderConfig
from d2v_serve.models.model_file import (
    METADATA_KEY,
    POOLINGS,
    PRECISIONS,
    REPRESENTATIONS,
    ModelFileMeta,
    OutputKind,
)
from d2v_serve.preprocess import conv_stride, min_audio_samples

from .graph import max_tokens


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versions(opset: int) -> dict[str, Any]:
    import onnxruntime
    import torch

    try:
        d2v = pkg_metadata.version("d2v")
    except pkg_metadata.PackageNotFoundError:
        d2v = D2V_VERSION
    return {"d2v": d2v, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "opset": opset}


def text_max_positions(cfg: EncoderConfig, preprocessing: dict[str, Any]) -> int:
    """Most tokens (specials included) the server may feed: the tokenizer's limit within the position table's."""
    return min(int(preprocessing.get("max_length", max_tokens(cfg))), max_tokens(cfg))


def training_crop_seconds(ckpt: dict[str, Any]) -> float | None:
    """Audio: the crop the model was trained on, from the checkpoint's training config (the server's default
    chunking window); None for checkpoints without one (imported ones)."""
    training = ckpt.get("training")
    data = training.get("config", {}).get("data", {}) if isinstance(training, dict) else {}
    samples = data.get("max_samples") if isinstance(data, dict) else None
    if not samples:
        return None
    return float(samples) / int(ckpt["preprocessing"].get("sample_rate", 16000))


def pooled_target(cfg: EncoderConfig) -> bool:
    """Whether the target space carries information when pooled over time: not when each layer is instance-normalised
    over time without a final norm (its mean over time is zero by construction)."""
    return not (cfg.target_norm == "instance" and not cfg.target_final_norm)


def build_metadata(ckpt: dict[str, Any], cfg: EncoderConfig, *, precision: str, checkpoint: str | Path,
                   checkpoint_sha256: str, opset: int, parity: dict[str, Any]) -> ModelFileMeta:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    fields: dict[str, Any] = {}
    if cfg.modality == "audio":
        layers = tuple(tuple(c) for c in cfg.conv_layers)
        fields.update(conv_layers=layers, conv_stride=conv_stride(layers), receptive_field=min_audio_samples(layers),
                      training_crop_seconds=training_crop_seconds(ckpt))
    elif cfg.modality == "image":
        fields.update(image_size=cfg.image_size, patch_size=cfg.patch_size)
    else:
        fields["max_positions"] = text_max_positions(cfg, ckpt["preprocessing"])
    source: dict[str, Any] = {"checkpoint_sha256": checkpoint_sha256, "checkpoint": Path(checkpoint).name}
    if isinstance(ckpt.get("source"), dict):  # imported checkpoints say where they came from
        source["imported"] = ckpt["source"]
    target_poolings = POOLINGS if pooled_target(cfg) else ("none",)
    return ModelFileMeta(
        modality=cfg.modality, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
        precision=precision, preprocessing=ckpt["preprocessing"],
        representations={"last": OutputKind(REPRESENTATIONS["last"]),
                         "target": OutputKind(REPRESENTATIONS["target"], target_poolings)},
        target_layers=cfg.target_layers, source=source, exporter=versions(opset), parity=parity, **fields)


def attach(model: onnx.ModelProto, meta: ModelFileMeta) -> None:
    """Set the "d2v" entry (replacing an old one); compact JSON, key order as built, so files are reproducible."""
    for i, prop in enumerate(model.metadata_props):
        if prop.key == METADATA_KEY:
            del model.metadata_props[i]
            break
    entry = model.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = json.dumps(meta.to_dict(), ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def read(model: onnx.ModelProto | str | Path) -> ModelFileMeta:
    """The contract of a model (or file: loaded without its graph's external data)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return ModelFileMeta.from_dict(json.loads(prop.value))
    raise KeyError(f"no '{METADATA_KEY}' metadata in the model")
