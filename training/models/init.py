"""Fresh weights for pretraining from scratch (BERT-style: normal(0, 0.02) linears and embeddings)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def init_weights(module: nn.Module, std: float = 0.02) -> nn.Module:
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Embedding):
            m.weight.normal_(0.0, std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.zero_()
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.Conv1d | nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                m.bias.zero_()
    for name, p in module.named_parameters():
        if name in ("cls_token", "mask_token"):
            p.normal_(0.0, std)
    return module
