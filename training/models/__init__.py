"""Encoders: one Transformer, three front ends."""

from __future__ import annotations

from torch import nn

from .audio import AudioEncoder, conv_output_lengths
from .config import MODALITIES, PRESETS, EncoderConfig
from .image import ImageEncoder
from .text import TextEncoder
from .transformer import EncoderOutput

ENCODERS: dict[str, type[nn.Module]] = {"audio": AudioEncoder, "image": ImageEncoder, "text": TextEncoder}


def build_encoder(cfg: EncoderConfig) -> nn.Module:
    return ENCODERS[cfg.modality](cfg)


__all__ = [
    "MODALITIES", "PRESETS", "AudioEncoder", "EncoderConfig", "EncoderOutput", "ImageEncoder", "TextEncoder",
    "build_encoder", "conv_output_lengths",
]
