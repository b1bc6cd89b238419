"""Small random d2v checkpoints for tests: built locally, deterministic, seconds to make."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from d2v_serve.preprocess import AudioPreprocessing, ImagePreprocessing, train_bpe_tokenizer
from tests.hf_models import CORPUS
from training.checkpoint import make_checkpoint, save_checkpoint
from training.models import EncoderConfig, build_encoder
from training.models.init import init_weights


def tiny_preprocessing(cfg: EncoderConfig) -> dict[str, Any]:
    if cfg.modality == "audio":
        return AudioPreprocessing().to_dict()
    if cfg.modality == "image":
        return ImagePreprocessing(image_size=cfg.image_size, resize_size=cfg.image_size).to_dict()
    return train_bpe_tokenizer(CORPUS, vocab_size=300, min_frequency=1).to_dict()


def tiny_checkpoint(modality: str, preset: str = "tiny", seed: int = 0, **overrides: Any) -> dict[str, Any]:
    cfg = EncoderConfig.preset(modality, preset, **overrides)
    pre = tiny_preprocessing(cfg)
    if modality == "text":
        from d2v_serve.preprocess import TextPreprocessing

        cfg = cfg.replace(vocab_size=TextPreprocessing.from_dict(pre).vocab_size, max_positions=66)
        pre["max_length"] = 64
    torch.manual_seed(seed)
    encoder = init_weights(build_encoder(cfg))
    with torch.no_grad():  # non-trivial norms and layer scales, so mistakes in mapping or export show
        for name, p in encoder.named_parameters():
            if "norm" in name or "gamma" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return make_checkpoint(cfg, encoder.state_dict(), pre)


def write_tiny_checkpoint(modality: str, directory: Path, name: str | None = None, **kwargs: Any) -> Path:
    return save_checkpoint(Path(directory) / (name or f"{modality}.pt"), tiny_checkpoint(modality, **kwargs))
