"""The one Transformer every modality shares: post-LN (audio, text) or pre-LN with layer scale (image)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import EncoderConfig


@dataclass
class EncoderOutput:
    last_hidden_state: Tensor  # [B, T, D]
    hidden_states: list[Tensor]  # L + 1: the input to layer 0, then each block's output
    ffn_outputs: list[Tensor | None]  # L: FFN output before the last residual (None where layerdrop skipped)
    valid_mask: Tensor  # [B, T] bool, True at real (non-padded) output positions


class RelativePositionBias(nn.Module):
    """BEiT relative position bias over a square patch grid plus a CLS token (3 extra rows for CLS pairs)."""

    def __init__(self, grid_size: int, num_heads: int) -> None:
        super().__init__()
        span = 2 * grid_size - 1
        self.num_distances = span * span + 3
        self.table = nn.Parameter(torch.zeros(self.num_distances, num_heads))
        self.register_buffer("index", self._index(grid_size, self.num_distances), persistent=False)

    @staticmethod
    def _index(grid_size: int, num_distances: int) -> Tensor:
        rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
        coords = torch.stack([rows.flatten(), cols.flatten()])  # [2, P]
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (grid_size - 1)
        patches = grid_size * grid_size
        index = torch.zeros(patches + 1, patches + 1, dtype=torch.long)
        index[1:, 1:] = rel[..., 0] * (2 * grid_size - 1) + rel[..., 1]
        index[0, :] = num_distances - 3  # CLS attends to patches
        index[:, 0] = num_distances - 2  # patches attend to CLS
        index[0, 0] = num_distances - 1
        return index

    def forward(self, positions: Tensor | None = None) -> Tensor:
        """[1, H, N, N] over the whole grid, or [B, H, K, K] between the token `positions` [B, K] (0: CLS, 1 + p:
        patch p) that a data2vec 2.0 student keeps."""
        if positions is None:
            n = self.index.shape[0]
            return self.table[self.index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        return self.table[self.index[positions[:, :, None], positions[:, None, :]]].permute(0, 3, 1, 2)


class SelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig, key_bias: bool, rel_pos_bias: bool) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d, bias=key_bias)
        self.v = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.dropout = cfg.attention_dropout
        self.rel_pos_bias = RelativePositionBias(cfg.grid_size, cfg.num_heads) if rel_pos_bias else None
        self.use_sdpa = True  # export may switch to the plain math (see export notes on relative position bias)

    def forward(self, x: Tensor, bias: Tensor | None, positions: Tensor | None = None) -> Tensor:
        b, t, d = x.shape
        q, k, v = (proj(x).view(b, t, self.num_heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        if self.rel_pos_bias is not None:
            own = self.rel_pos_bias(positions)
            bias = own if bias is None else bias + own
        p = self.dropout if self.training else 0.0
        if self.use_sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        else:
            scores = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5)
            if bias is not None:
                scores = scores + bias
            y = F.dropout(scores.softmax(-1), p, self.training) @ v
        return self.out(y.transpose(1, 2).reshape(b, t, d))


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu": F.gelu, "gelu_new": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh, "relu": F.relu,
               "silu": F.silu, "swish": F.silu}


class FeedForward(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.ffn_size)
        self.fc2 = nn.Linear(cfg.ffn_size, cfg.hidden_size)
        self.activation = ACTIVATIONS[cfg.activation]
        self.activation_dropout = nn.Dropout(cfg.activation_dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation_dropout(self.activation(self.fc1(x))))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class TransformerLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig, drop_path: float) -> None:
        super().__init__()
        image = cfg.modality == "image"
        self.pre_norm = cfg.layer_norm_first
        self.attn = SelfAttention(cfg, key_bias=not image, rel_pos_bias=cfg.rel_pos_bias in ("per_layer", "both"))
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.drop_path = DropPath(drop_path)
        if cfg.layer_scale_init > 0 and self.pre_norm:
            self.gamma_attn = nn.Parameter(torch.full((cfg.hidden_size,), cfg.layer_scale_init))
            self.gamma_ffn = nn.Parameter(torch.full((cfg.hidden_size,), cfg.layer_scale_init))
        else:
            self.gamma_attn = self.gamma_ffn = None

    def forward(self, x: Tensor, bias: Tensor | None, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.pre_norm:
            a = self.dropout(self.attn(self.attn_norm(x), bias, positions))
            x = x + self.drop_path(a if self.gamma_attn is None else self.gamma_attn * a)
            f = self.ffn(self.ffn_norm(x))
            g = self.dropout(f)
            x = x + self.drop_path(g if self.gamma_ffn is None else self.gamma_ffn * g)
            return x, f
        x = self.attn_norm(x + self.dropout(self.attn(x, bias, positions)))
        f = self.ffn(x)
        return self.ffn_norm(x + self.dropout(f)), f


class Transformer(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.layerdrop = cfg.layerdrop
        rates = [cfg.drop_path * i / max(1, cfg.num_layers - 1) for i in range(cfg.num_layers)]  # linear decay
        self.layers = nn.ModuleList(TransformerLayer(cfg, r) for r in rates)
        shared = cfg.modality == "image" and cfg.rel_pos_bias in ("shared", "both")
        self.rel_pos_bias = RelativePositionBias(cfg.grid_size, cfg.num_heads) if shared else None

    def forward(self, x: Tensor, valid_mask: Tensor | None, positions: Tensor | None = None) -> EncoderOutput:
        """`positions` [B, K]: which tokens of the full image sequence x holds (relative position bias only)."""
        bias = None
        if valid_mask is not None:  # additive key-padding mask, [B, 1, 1, T]
            bias = torch.zeros_like(valid_mask, dtype=x.dtype).masked_fill(~valid_mask, torch.finfo(x.dtype).min)
            bias = bias[:, None, None, :]
        if self.rel_pos_bias is not None:
            shared = self.rel_pos_bias(positions)
            bias = shared if bias is None else bias + shared
        hidden_states: list[Tensor] = [x]
        ffn_outputs: list[Tensor | None] = []
        for layer in self.layers:
            if self.training and self.layerdrop > 0 and torch.rand(()) < self.layerdrop:
                ffn_outputs.append(None)
            else:
                x, f = layer(x, bias, positions)
                ffn_outputs.append(f)
            hidden_states.append(x)
        if valid_mask is None:
            valid_mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return EncoderOutput(x, hidden_states, ffn_outputs, valid_mask)
