"""Per-modality dispatch: preprocessing config from its dict, prepared items -> padded graph inputs, and padded
outputs -> their mean over the valid positions."""

from __future__ import annotations

from typing import Any

import numpy as np

from .audio import AudioPreprocessing
from .image import ImagePreprocessing
from .text import TextPreprocessing

MODALITIES = ("audio", "image", "text")
Preprocessing = AudioPreprocessing | ImagePreprocessing | TextPreprocessing
_CONFIGS: dict[str, type[AudioPreprocessing] | type[ImagePreprocessing] | type[TextPreprocessing]] = {
    "audio": AudioPreprocessing,
    "image": ImagePreprocessing,
    "text": TextPreprocessing,
}


def preprocessing_from_dict(modality: str, d: dict[str, Any]) -> Preprocessing:
    """The preprocessing dataclass of `modality` from its JSON dict (checkpoint or ONNX metadata)."""
    if modality not in _CONFIGS:
        raise ValueError(f"unknown modality {modality!r} (expected one of {MODALITIES})")
    return _CONFIGS[modality].from_dict(d)


def collate(modality: str, items: list[np.ndarray], pad_id: int = 1) -> dict[str, np.ndarray]:
    """Prepared items -> graph inputs: audio `input_values` float32 / text `input_ids` int64, right-padded, with
    `attention_mask` int64 [B, L]; image `pixel_values` float32 [B, 3, H, W] stacked (all items the same size)."""
    if not items:
        raise ValueError("collate needs at least one item")
    if modality == "image":
        shapes = {x.shape for x in items}
        if len(shapes) != 1:
            raise ValueError(f"image items differ in shape: {sorted(shapes)}")
        return {"pixel_values": np.stack(items).astype(np.float32, copy=False)}
    if modality == "audio":
        name, dtype, pad_value = "input_values", np.float32, 0.0
    elif modality == "text":
        name, dtype, pad_value = "input_ids", np.int64, pad_id
    else:
        raise ValueError(f"unknown modality {modality!r} (expected one of {MODALITIES})")
    if any(x.ndim != 1 for x in items):
        raise ValueError(f"{modality} items must be 1-D, got shapes {[x.shape for x in items]}")
    lengths = np.array([len(x) for x in items])
    values = np.full((len(items), int(lengths.max())), pad_value, dtype=dtype)
    for row, x in zip(values, items, strict=True):
        row[: len(x)] = x
    mask = (np.arange(values.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
    return {name: values, "attention_mask": mask}


def masked_mean(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over the valid positions: [B, T, D] with a [B, T] mask -> [B, D], in float64 (an item without valid
    positions gives zeros). `d2v.training.pooling.masked_mean` is its torch twin."""
    w = np.asarray(mask).astype(np.float64)[..., None]
    return (np.asarray(x, dtype=np.float64) * w).sum(1) / np.maximum(w.sum(1), 1.0)
