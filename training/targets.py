"""The data2vec target space: the mean of the top-K layer outputs, each normalised (parameter-free).

Used by the objective (teacher targets) and by export (the `target_hidden_state` output), so both are one function.
The per-layer instance norm (audio) is taken over valid frames only, so padding never changes an item's targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .models import EncoderConfig, EncoderOutput

EPS = 1e-5


def top_layer_outputs(out: EncoderOutput, cfg: EncoderConfig) -> list[Tensor]:
    layers = out.ffn_outputs if cfg.target_source == "ffn" else out.hidden_states[1:]
    top = layers[-cfg.target_layers:]
    if any(t is None for t in top):
        raise ValueError("a target layer was skipped by layerdrop; build targets from a teacher in eval mode")
    return top


def masked_instance_norm(x: Tensor, valid_mask: Tensor) -> Tensor:
    """Normalise each channel over the valid time steps of each item. x [B, T, D], valid_mask [B, T]."""
    w = valid_mask.unsqueeze(-1).to(x.dtype)
    count = w.sum(1, keepdim=True).clamp_min(1.0)
    mean = (x * w).sum(1, keepdim=True) / count
    var = (((x - mean) * w) ** 2).sum(1, keepdim=True) / count
    return (x - mean) / torch.sqrt(var + EPS) * w


def normalize_layer(x: Tensor, valid_mask: Tensor, kind: str) -> Tensor:
    if kind == "instance":
        return masked_instance_norm(x, valid_mask)
    if kind == "layer":
        return F.layer_norm(x, x.shape[-1:], eps=EPS)
    if kind == "none":  # the raw layer output (fairseq data2vec_vision: no per-layer norm, one after averaging)
        return x
    raise ValueError(f"unknown target norm {kind!r}")


def target_representation(out: EncoderOutput, cfg: EncoderConfig) -> Tensor:
    """[B, T, D] float32: what the data2vec student learns to predict at every position."""
    valid = out.valid_mask
    if cfg.modality == "image" and cfg.target_norm == "instance":  # over the patches: the CLS token stays out
        valid = valid.clone()
        valid[:, 0] = False
    layers = [normalize_layer(t.float(), valid, cfg.target_norm) for t in top_layer_outputs(out, cfg)]
    y = torch.stack(layers).mean(0)
    if cfg.target_final_norm:
        y = F.layer_norm(y, y.shape[-1:], eps=EPS)
    return y
