"""Small random d2v checkpoints for tests: built locally, deterministic, seconds to make."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from d2v.training.checkpoint import make_checkpoint, save_checkpoint
from d2v.training.models import EncoderConfig, build_encoder
from d2v.training.models.init import init_weights
from d2v_serve.preprocess import AudioPreprocessing, ImagePreprocessing, train_bpe_tokenizer
from tests.hf_models import CORPUS


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


_MODEL_FILES: dict[str, bytes] = {}  # exports are deterministic: one export per (modality, precision, kwargs)


def make_model_file(modality: str, directory: Path, precision: str = "fp32", **checkpoint_kwargs: Any) -> Path:
    """A tiny checkpoint exported to a verified d2v ONNX model file `directory/{modality}.onnx` (fp32) or
    `directory/{modality}-{precision}.onnx` (fp16, int8). Only the model file is left in `directory`."""
    import tempfile

    from d2v.export import export_model

    if precision not in ("fp32", "fp16", "int8"):
        raise ValueError(f"precision must be fp32, fp16 or int8, got {precision!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / (f"{modality}.onnx" if precision == "fp32" else f"{modality}-{precision}.onnx")
    key = repr((modality, precision, sorted(checkpoint_kwargs.items())))
    if key not in _MODEL_FILES:
        with tempfile.TemporaryDirectory(prefix="d2v-model-file-") as tmp:
            ckpt = write_tiny_checkpoint(modality, Path(tmp), **checkpoint_kwargs)
            model = export_model(ckpt, Path(tmp) / "model.onnx", fp16=precision == "fp16",
                                 int8=precision == "int8")
            _MODEL_FILES[key] = Path(model["path"]).read_bytes()
    out.write_bytes(_MODEL_FILES[key])
    return out
