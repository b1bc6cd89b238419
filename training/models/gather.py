"""Gather the visible positions of a sequence (data2vec 2.0's student) and scatter them back (its decoder)."""

from __future__ import annotations

import torch
from torch import Tensor


def gather_positions(x: Tensor, index: Tensor) -> Tensor:
    """x [B, T, ...], index [B, K] (int64) -> [B, K, ...]: row b keeps x[b, index[b]]."""
    shape = index.shape + x.shape[2:]
    return torch.gather(x, 1, index.reshape(*index.shape, *[1] * (x.dim() - 2)).expand(shape))


def scatter_positions(values: Tensor, index: Tensor, length: int, fill: Tensor) -> Tensor:
    """values [B, K, D] back to their positions `index` [B, K] in a [B, length, D] tensor that holds `fill`
    ([B, length, D]) everywhere else."""
    return fill.scatter(1, index.unsqueeze(-1).expand_as(values), values.to(fill.dtype))
