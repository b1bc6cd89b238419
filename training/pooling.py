"""Mean pooling over valid positions in torch: the twin of `d2v_serve.preprocess.masked_mean` (tested against it)."""

from __future__ import annotations

from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """[B, T, D] with a [B, T] mask -> [B, D] in x's dtype (an item without valid positions gives zeros)."""
    w = mask.unsqueeze(-1).to(x.dtype)
    return (x * w).sum(1) / w.sum(1).clamp_min(1)
