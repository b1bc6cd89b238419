"""Deterministic graph inputs for verification: a batch of 1 and mixed-length padded batches per modality."""

from __future__ import annotations

from typing import Any

import numpy as np

from d2v.training.models import EncoderConfig
from d2v_serve.preprocess import conv_stride, min_audio_samples

from .graph import max_tokens

# Frames (audio) / tokens (text) per item; image batches have only a size. Lengths are capped by the model.
AUDIO_FRAMES = [[23], [31, 12, 25], [9, 17]]
TEXT_TOKENS = [[9], [17, 5, 12], [None, 3]]  # None: the longest input the model accepts
IMAGE_BATCHES = [1, 3, 2]


def verification_inputs(cfg: EncoderConfig, preprocessing: dict[str, Any], seed: int = 0
                        ) -> list[dict[str, np.ndarray]]:
    """Graph inputs, zero / pad_id padded exactly as serving's collate pads them."""
    rng = np.random.default_rng(seed)
    if cfg.modality == "image":
        size = cfg.image_size
        return [{"pixel_values": rng.standard_normal((b, cfg.num_channels, size, size)).astype(np.float32)}
                for b in IMAGE_BATCHES]
    if cfg.modality == "audio":
        field, stride = min_audio_samples(cfg.conv_layers), conv_stride(cfg.conv_layers)
        # odd sample counts (not whole frames), so the frame arithmetic at the edges is exercised too
        lengths = [[field + (f - 1) * stride + stride // 3 for f in frames] for frames in AUDIO_FRAMES]
        return [_padded([rng.standard_normal(n).astype(np.float32) for n in ns], "input_values", 0)
                for ns in lengths]
    top = max_tokens(cfg)
    batches = []
    for ns in TEXT_TOKENS:
        items = []
        for n in ns:
            n = top if n is None else min(n, top)
            body = rng.integers(cfg.pad_id + 1, cfg.vocab_size, size=n).astype(np.int64)
            body[0], body[-1] = preprocessing.get("bos_id", 0), preprocessing.get("eos_id", 2)
            items.append(body)
        batches.append(_padded(items, "input_ids", cfg.pad_id))
    return batches


def _padded(items: list[np.ndarray], name: str, pad_value: float) -> dict[str, np.ndarray]:
    longest = max(len(x) for x in items)
    values = np.full((len(items), longest), pad_value, dtype=items[0].dtype)
    mask = np.zeros((len(items), longest), dtype=np.int64)
    for i, x in enumerate(items):
        values[i, : len(x)] = x
        mask[i, : len(x)] = 1
    return {name: values, "attention_mask": mask}


def shape_of(inputs: dict[str, np.ndarray]) -> list[int]:
    return list(next(iter(inputs.values())).shape)
