"""data2vec text front end (a RoBERTa): token, position (padding offset) and token-type embeddings."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import EncoderConfig
from .gather import gather_positions
from .transformer import EncoderOutput, Transformer


class TextEncoder(nn.Module):
    input_names = ("input_ids", "attention_mask")

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.token_embed = nn.Embedding(cfg.vocab_size, d, padding_idx=cfg.pad_id)
        self.position_embed = nn.Embedding(cfg.max_positions, d, padding_idx=cfg.pad_id)
        self.token_type_embed = nn.Embedding(cfg.type_vocab_size, d)
        self.embed_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.input_dropout = nn.Dropout(cfg.dropout)
        self.transformer = Transformer(cfg)

    def embed(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        valid = input_ids.ne(self.cfg.pad_id) if attention_mask is None else attention_mask.bool()
        # RoBERTa positions: real tokens count from pad_id + 1, padding sits at pad_id.
        positions = torch.cumsum(valid.long(), dim=1) * valid.long() + self.cfg.pad_id
        x = self.token_embed(input_ids) + self.position_embed(positions)
        x = x + self.token_type_embed.weight[0]
        return self.input_dropout(self.embed_norm(x)), (valid if attention_mask is not None else None)

    def encode(self, x: Tensor, valid_mask: Tensor | None, keep: Tensor | None = None) -> EncoderOutput:
        """`keep` [B, K] (data2vec 2.0): encode only these tokens (their embeddings already carry positions)."""
        if keep is not None:
            x = gather_positions(x, keep)
            valid_mask = None if valid_mask is None else gather_positions(valid_mask, keep)
        return self.transformer(x, valid_mask)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, mask: Tensor | None = None
    ) -> EncoderOutput:
        if mask is not None:
            raise ValueError("text masking replaces input_ids before the encoder; pass the masked ids instead")
        x, valid = self.embed(input_ids, attention_mask)
        return self.encode(x, valid)
