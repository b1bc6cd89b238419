"""The d2v checkpoint: one `.pt` file that loads with `torch.load(weights_only=True)` and never runs code."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models import EncoderConfig, build_encoder

FORMAT = "d2v-checkpoint"
FORMAT_VERSION = 1
D2V_VERSION = "0.1.0"


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line a user can act on."""


def make_checkpoint(
    cfg: EncoderConfig,
    model_state: dict[str, torch.Tensor],
    preprocessing: dict[str, Any],
    training: dict[str, Any] | None = None,
) -> dict[str, Any]:
    ckpt = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "d2v_version": D2V_VERSION,
        "modality": cfg.modality,
        "config": cfg.to_dict(),
        "model": {k: v.detach().cpu().contiguous() for k, v in model_state.items()},
        "preprocessing": preprocessing,
    }
    if training is not None:
        ckpt["training"] = training
    return ckpt


def save_checkpoint(path: str | Path, ckpt: dict[str, Any]) -> Path:
    """Write atomically: a temp file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the unpickler raises anything on foreign bytes (KeyError, EOFError...)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in reason or "Weights only load failed" in reason:
            # torch's advice (load with weights_only=False) would run the file's code: d2v checkpoints never need it
            reason = "it holds Python objects beyond tensors and plain values, which a d2v checkpoint never does"
        raise CheckpointError(f"{path}: not a readable d2v checkpoint (truncated or foreign file: {reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a d2v checkpoint (no '{FORMAT}' format marker)")
    version = ckpt.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version!r} is newer than this d2v reads "
                              f"({FORMAT_VERSION}); upgrade d2v")
    for key in ("modality", "config", "model", "preprocessing"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint lacks '{key}'")
    return ckpt


def encoder_config(ckpt: dict[str, Any]) -> EncoderConfig:
    try:
        return EncoderConfig.from_dict(ckpt["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint config is invalid: {e}") from None


def initial_encoder(cfg: EncoderConfig, seed: int, std: float = 0.02) -> nn.Module:
    """The weights a fresh `d2v-train` run with this seed starts from (what `--steps 0` writes)."""
    from .models.init import init_weights

    torch.manual_seed(seed)
    return init_weights(build_encoder(cfg), std=std)


def run_start(ckpt: dict[str, Any]) -> dict[str, Any]:
    """How the run that wrote a checkpoint initialised its weights: seed and init_std (d2v-train's defaults for
    checkpoints without a training config, e.g. imports)."""
    cfg = ckpt.get("training", {}).get("config", {})
    return {"seed": int(cfg.get("seed", 1)), "std": float(cfg.get("init_std") or 0.02)}


def load_encoder(ckpt: dict[str, Any]) -> nn.Module:
    """Build the encoder a checkpoint describes and load its weights strictly, in eval mode."""
    encoder = build_encoder(encoder_config(ckpt))
    try:
        encoder.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"checkpoint weights do not fit its config: {' '.join(first[:2])}") from None
    return encoder.eval()
