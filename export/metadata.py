"""The model file describes itself: JSON under key "d2v" in the ONNX `metadata_props` (schema in the contracts)."""

from __future__ import annotations

import hashlib
import json
from importlib import metadata as pkg_metadata
from pathlib import Path
from typing import Any

import onnx

from d2v.training.checkpoint import D2V_VERSION
from d2v.training.models import EncoderConfig

from .graph import INPUTS, OUTPUTS, max_tokens

KEY = "d2v"
FORMAT = "d2v-onnx"
FORMAT_VERSION = 1
PRECISIONS = ("fp32", "fp16", "int8")


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


def build_metadata(ckpt: dict[str, Any], cfg: EncoderConfig, *, precision: str, checkpoint: str | Path,
                   checkpoint_sha256: str, opset: int, parity: dict[str, Any]) -> dict[str, Any]:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "modality": cfg.modality,
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "inputs": list(INPUTS[cfg.modality]),
        "outputs": list(OUTPUTS),
        "precision": precision,
        "preprocessing": ckpt["preprocessing"],
    }
    if cfg.modality == "audio":
        meta["conv_layers"] = [list(c) for c in cfg.conv_layers]
        crop = training_crop_seconds(ckpt)
        if crop is not None:
            meta["training_crop_seconds"] = crop
    elif cfg.modality == "image":
        meta["image_size"] = cfg.image_size
    else:
        meta["max_positions"] = text_max_positions(cfg, ckpt["preprocessing"])
    meta["target_layers"] = cfg.target_layers
    source: dict[str, Any] = {"checkpoint_sha256": checkpoint_sha256, "checkpoint": Path(checkpoint).name}
    if isinstance(ckpt.get("source"), dict):  # imported checkpoints say where they came from
        source["imported"] = ckpt["source"]
    meta["source"] = source
    meta["exporter"] = versions(opset)
    meta["parity"] = parity
    return meta


def attach(model: onnx.ModelProto, meta: dict[str, Any]) -> None:
    """Set the "d2v" entry (replacing an old one); compact JSON, key order as built, so files are reproducible."""
    for i, prop in enumerate(model.metadata_props):
        if prop.key == KEY:
            del model.metadata_props[i]
            break
    entry = model.metadata_props.add()
    entry.key = KEY
    entry.value = json.dumps(meta, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def read(model: onnx.ModelProto | str | Path) -> dict[str, Any]:
    """The "d2v" metadata of a model (or file: loaded without its graph's external data)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == KEY:
            return json.loads(prop.value)
    raise KeyError(f"no '{KEY}' metadata in the model")
