"""AdamW parameter groups shared by the objectives: decay on matrices, none on norms, biases and learned tokens."""

from __future__ import annotations

import torch
from torch import nn

from ..config import OptimizerConfig

NO_DECAY = ("cls_token", "mask_token", "mask_embedding", "rel_pos_bias", "pos_embed")


def adamw(module: nn.Module, opt: OptimizerConfig, device_type: str, faster: nn.Parameter | None = None
          ) -> torch.optim.Optimizer:
    """AdamW over `module`'s trainable parameters. `faster` (the text token embeddings when
    opt.embed_lr_scale != 1) gets a group of its own, stepped at embed_lr_scale x the scheduled lr (`lr_scale`)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or any(k in name for k in NO_DECAY) else decay).append(p)
    extra = []
    if faster is not None and opt.embed_lr_scale != 1.0:
        extra = [{"params": [faster], "weight_decay": opt.weight_decay, "lr_scale": opt.embed_lr_scale}]
        decay = [p for p in decay if p is not faster]
    groups = [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}, *extra]
    return torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
                             **({"fused": True} if device_type == "cuda" else {"foreach": True}))
