"""data2vec image front end (a BEiT): patch embedding, CLS token, learned mask token; no absolute positions."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import EncoderConfig
from .transformer import EncoderOutput, Transformer


class ImageEncoder(nn.Module):
    input_names = ("pixel_values",)

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.patch_embed = nn.Conv2d(cfg.num_channels, d, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.input_dropout = nn.Dropout(cfg.dropout)
        self.transformer = Transformer(cfg)
        # Published pretrained models end with a layer norm; mean-pooling (fine-tuned) ones norm the pooled mean.
        self.final_norm = nn.Identity() if cfg.mean_pooling else nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.pool_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps) if cfg.mean_pooling else None

    def embed(self, pixel_values: Tensor) -> tuple[Tensor, None]:
        """Pixels [B, C, H, W] -> patch tokens [B, P, D] in row-major grid order."""
        size = self.cfg.image_size
        if pixel_values.shape[-2:] != (size, size):
            raise ValueError(f"expected {size}x{size} pixels, got {tuple(pixel_values.shape[-2:])}")
        return self.patch_embed(pixel_values).flatten(2).transpose(1, 2), None

    def encode(self, x: Tensor, valid_mask: Tensor | None = None) -> EncoderOutput:
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        out = self.transformer(self.input_dropout(torch.cat([cls, x], dim=1)), None)
        out.last_hidden_state = self.final_norm(out.last_hidden_state)
        return out

    def forward(self, pixel_values: Tensor, mask: Tensor | None = None) -> EncoderOutput:
        x, _ = self.embed(pixel_values)
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        return self.encode(x)

    def pooled(self, out: EncoderOutput) -> Tensor:
        """The published pooler: layer-normed mean of patch tokens, or the CLS token."""
        if self.pool_norm is not None:
            return self.pool_norm(out.last_hidden_state[:, 1:].mean(1))
        return out.last_hidden_state[:, 0]
