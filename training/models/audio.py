"""data2vec audio front end: conv feature encoder, feature projection, mask embedding, stacked positional convs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import EncoderConfig
from .gather import gather_positions
from .transformer import EncoderOutput, Transformer


def conv_output_lengths(lengths: Tensor, conv_layers: list[list[int]]) -> Tensor:
    for _, kernel, stride in conv_layers:
        lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
    return lengths


class ConvBlock(nn.Module):
    """Conv1d -> LayerNorm over channels -> GELU. Frame-local after the conv, so padding cannot leak sideways."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int, stride: int, bias: bool) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_dim, out_dim, kernel, stride=stride, bias=bias)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.norm(self.conv(x).transpose(1, 2)).transpose(1, 2))

    def channels_last(self, x: Tensor) -> Tensor:
        """The same block on [B, T, C_in] -> [B, T_out, C_out]: the conv as one MatMul over the `kernel` input frames
        of each output frame. The LayerNorm then needs no transposes, and int8 export quantizes the conv as a MatMul
        (onnxruntime's ConvInteger runs slower than its float32 Conv; its int8 MatMul ~2.5x faster)."""
        kernel, stride = self.conv.kernel_size[0], self.conv.stride[0]
        b, t, c = x.shape
        t_out = (t - kernel) // stride + 1
        if kernel == stride:  # the frames are consecutive rows: a view
            frames = x.narrow(1, 0, t_out * kernel).reshape(b, t_out, kernel * c)
        else:  # one row gather (a Gather in the graph: ~1.8x faster than strided Slices + Concat in onnxruntime)
            rows = (torch.arange(t_out, device=x.device) * stride)[:, None] + torch.arange(kernel, device=x.device)
            frames = x.index_select(1, rows.reshape(-1)).reshape(b, t_out, kernel * c)
        y = frames @ self.conv.weight.permute(2, 1, 0).reshape(kernel * c, -1)
        if self.conv.bias is not None:
            y = y + self.conv.bias
        return F.gelu(self.norm(y))


class FeatureProjection(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.conv_layers[-1][0], eps=cfg.layer_norm_eps)
        self.proj = nn.Linear(cfg.conv_layers[-1][0], cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.feature_dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(self.norm(x)))


class PositionalConv(nn.Module):
    """Grouped conv -> LayerNorm (no affine) -> GELU; an even kernel drops its last output frame."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        k = cfg.pos_conv_kernel
        self.conv = nn.Conv1d(cfg.hidden_size, cfg.hidden_size, k, padding=k // 2, groups=cfg.pos_conv_groups)
        self.trim = 1 if k % 2 == 0 else 0
        self.norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=False)

    def forward(self, x: Tensor) -> Tensor:  # [B, D, T]
        y = self.conv(x)
        if self.trim:
            y = y[:, :, : -self.trim]
        return F.gelu(self.norm(y.transpose(1, 2)).transpose(1, 2))


class AudioEncoder(nn.Module):
    input_names = ("input_values", "attention_mask")

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dims = [1] + [c[0] for c in cfg.conv_layers]
        self.feature_extractor = nn.ModuleList(
            ConvBlock(dims[i], dim, k, s, cfg.conv_bias) for i, (dim, k, s) in enumerate(cfg.conv_layers)
        )
        self.feature_projection = FeatureProjection(cfg)
        self.mask_embedding = nn.Parameter(torch.empty(cfg.hidden_size).uniform_())
        self.pos_conv = nn.ModuleList(PositionalConv(cfg) for _ in range(cfg.pos_conv_layers))
        self.input_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.input_dropout = nn.Dropout(cfg.dropout)
        self.transformer = Transformer(cfg)
        self.channels_last_front_end = False

    def embed(self, input_values: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Waveform [B, S] -> projected frames [B, T, D] and the frame validity mask."""
        if attention_mask is not None:  # whatever sits in padded samples must not matter
            input_values = input_values * attention_mask.to(input_values.dtype)
        x = self.feature_projection(self.conv_features(input_values))
        if attention_mask is None:
            return x, None
        lengths = conv_output_lengths(attention_mask.long().sum(-1), self.cfg.conv_layers)
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
        return x, valid

    def conv_features(self, waveform: Tensor) -> Tensor:
        """Waveform [B, S] -> conv features [B, T, C]. Inference runs the Conv1d blocks (channels first); with
        `channels_last_front_end` set (export sets it while tracing), and whenever gradients flow on CPU (training),
        each block is the same arithmetic as a MatMul over gathered frames, channels last throughout: on CPU its
        forward + backward is about 2x faster than Conv1d's at `tiny` and `small`, and faster at `base` too
        (docs/benchmarks.md, "Training throughput: the audio front end trains as MatMuls")."""
        if self.channels_last_front_end or (torch.is_grad_enabled() and waveform.device.type == "cpu"):
            x = waveform.unsqueeze(-1)
            for block in self.feature_extractor:
                x = block.channels_last(x)
            return x
        return self.conv1d_features(waveform)

    def conv1d_features(self, waveform: Tensor) -> Tensor:
        """The Conv1d blocks, channels first: the torch reference of the front end."""
        x = waveform.unsqueeze(1)
        for block in self.feature_extractor:
            x = block(x)
        return x.transpose(1, 2)

    def encode(self, x: Tensor, valid_mask: Tensor | None, keep: Tensor | None = None) -> EncoderOutput:
        """Positional convs, input norm and the Transformer. Padded frames are re-zeroed before every positional
        conv layer, so an item inside a padded batch computes exactly what it computes alone.

        `keep` [B, K] (data2vec 2.0): the Transformer sees only these frames. The others are zeroed before the
        positional convs (as the reference zeroes masked frames), so nothing of them reaches the kept ones."""
        shown = valid_mask
        if keep is not None:
            kept = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device).scatter_(1, keep, True)
            shown = kept if shown is None else shown & kept
        zero = None if shown is None else shown.unsqueeze(-1).to(x.dtype)
        pos = x if zero is None else x * zero
        x = pos
        pos = pos.transpose(1, 2)
        for layer in self.pos_conv:
            if zero is not None:
                pos = pos * zero.transpose(1, 2)
            pos = layer(pos)
        x = self.input_dropout(self.input_norm(x + pos.transpose(1, 2)))
        if keep is not None:
            x = gather_positions(x, keep)
            valid_mask = None if valid_mask is None else gather_positions(valid_mask, keep)
        return self.transformer(x, valid_mask)

    def forward(
        self, input_values: Tensor, attention_mask: Tensor | None = None, mask: Tensor | None = None
    ) -> EncoderOutput:
        x, valid = self.embed(input_values, attention_mask)
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), self.mask_embedding.to(x.dtype), x)
        return self.encode(x, valid)
