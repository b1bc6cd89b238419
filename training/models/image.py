"""data2vec image front end (a BEiT): patch embedding, CLS token, learned mask token; absolute positions optional
(the published models use relative position bias only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import EncoderConfig
from .gather import gather_positions
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
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, d)) if cfg.abs_pos_embed else None
        self.input_dropout = nn.Dropout(cfg.dropout)
        self.transformer = Transformer(cfg)
        # Published pretrained models end with a layer norm; mean-pooling (fine-tuned) ones have none (identity) and
        # may norm the pooled mean instead.
        self.final_norm = nn.Identity() if cfg.mean_pooling else nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        pool_norm = cfg.mean_pooling and cfg.pool_norm
        self.pool_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps) if pool_norm else None

    def embed(self, pixel_values: Tensor) -> tuple[Tensor, None]:
        """Pixels [B, C, H, W] -> patch tokens [B, P, D] in row-major grid order."""
        size = self.cfg.image_size
        if pixel_values.shape[-2:] != (size, size):
            raise ValueError(f"expected {size}x{size} pixels, got {tuple(pixel_values.shape[-2:])}")
        return self.patch_embed(pixel_values).flatten(2).transpose(1, 2), None

    def encode(self, x: Tensor, valid_mask: Tensor | None = None, keep: Tensor | None = None) -> EncoderOutput:
        """`keep` [B, K] (data2vec 2.0): encode the CLS token and only these patches; relative position bias (and
        absolute positions) follow the kept patches' places on the grid."""
        positions = None
        if keep is not None:
            x = gather_positions(x, keep)
            positions = F.pad(keep + 1, (1, 0))  # token 0 is CLS, patch p is token p + 1
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        if self.pos_embed is not None:
            pos = self.pos_embed if positions is None else gather_positions(self.pos_embed.expand(len(x), -1, -1),
                                                                            positions)
            x = x + pos.to(x.dtype)
        out = self.transformer(self.input_dropout(x), None, positions)
        out.last_hidden_state = self.final_norm(out.last_hidden_state)
        return out

    def forward(self, pixel_values: Tensor, mask: Tensor | None = None) -> EncoderOutput:
        x, _ = self.embed(pixel_values)
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        return self.encode(x)

    def pooled(self, out: EncoderOutput) -> Tensor:
        """The published pooler: the mean of the patch tokens (layer-normed when the model has that norm), or the
        CLS token."""
        if self.cfg.mean_pooling:
            mean = out.last_hidden_state[:, 1:].mean(1)
            return mean if self.pool_norm is None else self.pool_norm(mean)
        return out.last_hidden_state[:, 0]
