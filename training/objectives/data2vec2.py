"""data2vec 2.0 (arXiv 2212.07525): the same teacher and targets as data2vec, used far more efficiently.

- The EMA teacher encodes each clean item once; its targets serve `num_masks` (M) masked copies of the item.
- The student encodes only the positions each copy keeps visible (a gather: every row keeps the same number, so
  the expanded batch is dense), never a mask token.
- A light conv decoder (1-D over time for audio and text, 2-D over the patch grid for images) gets the student's
  outputs back in place, N(0, mask_noise_std) noise in the removed slots, and predicts the targets at the masked
  positions. It is training-only: checkpoints keep it under `training`, never in the encoder weights.

A sibling of data2vec.py: the same EMA teacher and targets (teacher.py) and regression (loss.py). `REFERENCE` holds
fairseq's data2vec 2.0 base pretraining configs value for value (docs/objectives.md); `RECIPES` the named recipes
(docs/research.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import InverseBlockMaskConfig, MultiMaskConfig, TrainConfig
from ..masking import MultiMasker
from ..models import EncoderConfig
from ..models.gather import scatter_positions
from ..pooling import masked_mean
from .data2vec import AUDIO_TEACHER, TEXT_EMBEDDINGS, loss_spec, teacher_spec
from .loss import LossSpec, StepOutput, regression_head, regression_loss, spread
from .teacher import StudentTeacher, TeacherSpec

# fairseq examples/data2vec/config/v2/base_{audio,images,text}_only_task.yaml and the data2vec_multi defaults they
# leave alone (docs/objectives.md). The decoder width scales with the model: decoder.dim None = the reference width x
# hidden / 768 (audio 384, image and text 768 at base).
REFERENCE: dict[str, dict[str, Any]] = {
    "audio": {
        "masking_type": MultiMaskConfig,
        "steps": 400000, "batch_size": 8,
        "optimizer": {"lr": 7.5e-4, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.01, "clip_grad": 0.0},
        "schedule": {"name": "cosine", "warmup_steps": 8000, "min_lr_ratio": 0.0},
        "ema": {"decay": 0.999, "end_decay": 0.99999, "anneal_steps": 75000},
        "loss": {"beta": 0.0, "scale": None, "reduce": "sum", "head_layers": 1, "cls_loss": 0.0},
        "teacher": {**AUDIO_TEACHER, "copy": [], "target_layers_of_12": 8},
        "masking": {"mask_prob": 0.5, "mask_length": 5, "num_masks": 8},
        "decoder": {"dim": None, "kernel": 7, "groups": 16, "layers": 4, "residual": True, "input_dropout": 0.1,
                    "mask_noise_std": 0.01},
        "model": {"layerdrop": 0.05, "target_source": "ffn", "target_norm": "instance", "target_final_norm": False},
        "data": {"max_samples": 320000, "min_samples": 0, "pad_audio": False},
    },
    "image": {
        "masking_type": InverseBlockMaskConfig,
        "steps": 375300, "batch_size": 16,
        "optimizer": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.05, "clip_grad": 4.0},
        "schedule": {"name": "cosine", "warmup_steps": 50040, "min_lr_ratio": 0.0},
        "ema": {"decay": 0.9998, "end_decay": 0.99999, "anneal_steps": 100000},
        "loss": {"beta": 0.0, "scale": None, "reduce": "sum", "head_layers": 1, "cls_loss": 0.01},
        "teacher": {"mask_param": "mask_token", "target_layers_of_12": 10},
        "guard": {"min_target_var": 0.0, "min_pred_var": 0.0},
        "masking": {"keep_fraction": 39 / 196, "keep_block": 3, "num_masks": 16},
        "decoder": {"dim": None, "kernel": 3, "groups": 16, "layers": 6, "residual": True, "input_dropout": 0.0,
                    "mask_noise_std": 0.01},
        "model": {"drop_path": 0.0, "layer_scale_init": 0.0, "target_source": "ffn", "target_norm": "instance",
                  "target_final_norm": True},
    },
    "text": {
        "masking_type": MultiMaskConfig,
        "steps": 1000000, "batch_size": 4,
        "optimizer": {"lr": 2e-4, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.01, "clip_grad": 1.0},
        "schedule": {"name": "cosine", "warmup_steps": 4000, "min_lr_ratio": 0.0},
        "ema": {"decay": 0.9999, "end_decay": 0.99999, "anneal_steps": 100000},
        "loss": {"beta": 0.0, "scale": 1.0, "reduce": "sum", "head_layers": 2, "cls_loss": 0.0},
        "teacher": {"copy": TEXT_EMBEDDINGS, "target_layers_of_12": 12},
        "masking": {"mask_prob": 0.48, "mask_length": 1, "num_masks": 8},
        "decoder": {"dim": None, "kernel": 9, "groups": 1, "layers": 5, "residual": False, "input_dropout": 0.1,
                    "mask_noise_std": 0.01},
        "model": {"layerdrop": 0.0, "target_source": "ffn", "target_norm": "instance", "target_final_norm": False},
    },
}

# "short": a few thousand updates of `tiny`/`small` on a small corpus; each value's evidence: docs/research.md.
RECIPES: dict[str, dict[str, dict[str, Any]]] = {"short": {
    "audio": {
        "batch_size": 2,  # research.md#short-audio-data2vec2: 2 items x 8 masks beat 4 x 4 per CPU second
        "optimizer": {"lr": 1.5e-3, "clip_grad": 2.0},  # research.md#short-audio-data2vec2: lr and clip, 8 seeds
        "schedule": {"warmup_steps": None, "warmup_frac": 0.02},  # research.md#short-audio-data2vec2
        "ema": {"decay": 0.9999},  # research.md#short-audio-data2vec2: a teacher near its initial weights
        "decoder": {"kernel": 5, "layers": 2, "input_dropout": 0.0},  # research.md#short-audio-data2vec2
        "model": {"layerdrop": 0.0},  # research.md#short-audio-data2vec2: no dropouts in a 4-layer model
        "data": {"max_samples": 250000},  # research.md#short-audio: the loader's default then
    },
    "image": {
        "schedule": {"warmup_steps": None, "warmup_frac": 0.1333},  # research.md#short-image-data2vec2: 2/15
        "loss": {"cls_loss": 0.0},  # research.md#short-image-data2vec2: the CLS term dominates a tiny run
        "guard": {"min_target_var": 0.1, "min_pred_var": 0.01},  # research.md#short-image-data2vec2: guarded
        "masking": {"num_masks": 4},  # research.md#short-image-data2vec2: M 4 most accuracy per CPU second
        "model": {"layer_scale_init": 1e-4},  # research.md#short-image-data2vec2: data2vec_vision's layer scale
    },
    "text": {
        "batch_size": 32,  # research.md#short-text-data2vec2: 4 masks of 32 documents
        "optimizer": {"embed_lr_scale": 15.0},  # research.md#short-text: embeddings at 15x the lr
        "schedule": {"warmup_steps": None, "warmup_frac": 0.01},  # research.md#short-text: 1 % warmup
        "ema": {"decay": 0.99999},  # research.md#short-text: a teacher that stays put
        "loss": {"head_input": "document"},  # research.md#short-text: predict from the visible mean
        "teacher": {"copy": []},  # research.md#short-text: the teacher keeps token embeddings of its own
        "masking": {"mask_prob": 0.5, "num_masks": 4},  # research.md#short-text-data2vec2: half masked, M 4
        "decoder": {"layers": 0},  # research.md#short-text-data2vec2: no convs under the document head
        "model": {"target_norm": "layer"},  # research.md#short-text-data2vec2: layer-normed targets
    },
}}


@dataclass(frozen=True)
class DecoderSpec:
    dim: int  # conv width
    kernel: int
    groups: int
    layers: int
    residual: bool = True  # around every block whose input width equals its output width
    input_dropout: float = 0.0  # on the student's outputs, before the noise goes in
    mask_noise_std: float = 0.01
    head_layers: int = 1  # the final projection: 1 Linear, or 2 (Linear -> GELU -> Linear, width 2 x dim)


class ConvDecoder(nn.Module):
    """[Conv (groups) -> LayerNorm without affine -> GELU] x layers, residual; then the projection to D. Padded
    positions are zeroed before every conv, so padding never reaches a valid position. 0 layers leaves only the
    projection (the short text recipe's document head, which has one position to read)."""

    def __init__(self, hidden: int, spec: DecoderSpec, spatial: bool) -> None:
        super().__init__()
        if spec.kernel % 2 == 0:
            raise ValueError(f"decoder.kernel must be odd, got {spec.kernel}")
        if hidden % spec.groups or spec.dim % spec.groups:
            raise ValueError(f"decoder.groups {spec.groups} must divide the hidden size {hidden} and decoder.dim "
                             f"{spec.dim}")
        conv = nn.Conv2d if spatial else nn.Conv1d
        self.spatial = spatial
        self.residual = spec.residual
        self.convs = nn.ModuleList(conv(hidden if i == 0 else spec.dim, spec.dim, spec.kernel,
                                        padding=spec.kernel // 2, groups=spec.groups) for i in range(spec.layers))
        self.proj = regression_head(spec.dim if spec.layers else hidden, spec.head_layers, out_dim=hidden)

    def features(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        """[N, T, D] -> [N, T, dim] (images: T a square number of patches in row-major order). Activations stay in
        this token layout; the convs read it channels-last, so LayerNorm and the residual never copy."""
        n, t, _ = x.shape
        keep = None if valid is None else valid.unsqueeze(-1).to(x.dtype)
        side = int(round(t ** 0.5))
        h = x
        for conv in self.convs:
            inp = h if keep is None else h * keep
            if self.spatial:
                y = conv(inp.view(n, side, side, -1).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(n, t, -1)
            else:
                y = conv(inp.transpose(1, 2)).transpose(1, 2)
            y = F.gelu(F.layer_norm(y, y.shape[-1:]))
            h = y + h if self.residual and y.shape == h.shape else y
        return h

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        return self.proj(self.features(x, valid))


class Data2Vec2(StudentTeacher):
    predictor = "decoder"  # the training-only module that maps student outputs to targets (its checkpoint key)

    def __init__(self, student: nn.Module, teacher: TeacherSpec, loss: LossSpec, decoder: DecoderSpec,
                 num_masks: int, cls_loss: float = 0.0) -> None:
        super().__init__(student, teacher, loss)
        self.head = ConvDecoder(student.cfg.hidden_size, decoder, student.cfg.modality == "image")
        self.decoder_spec = decoder
        self.num_masks = int(num_masks)
        self.cls_loss = float(cls_loss)
        if teacher.mask_param is not None:
            # the student never sees a masked position, so its mask embedding gets no gradient: frozen, so that DDP
            # finds every trainable parameter used
            getattr(student, teacher.mask_param).requires_grad_(False)

    @classmethod
    def from_config(cls, student: nn.Module, cfg: TrainConfig) -> Data2Vec2:
        d = cfg.decoder
        decoder = DecoderSpec(d.dim, d.kernel, d.groups, d.layers, d.residual, d.input_dropout, d.mask_noise_std,
                              head_layers=cfg.loss.head_layers)
        return cls(student, teacher_spec(cfg), loss_spec(cfg), decoder, cfg.masking.num_masks, cfg.loss.cls_loss)

    @staticmethod
    def masker(cfg: TrainConfig, enc: EncoderConfig, preprocessing: Any) -> MultiMasker:
        return MultiMasker(cfg.modality, dataclasses.asdict(cfg.masking), conv_layers=enc.conv_layers,
                           grid=enc.grid_size)

    def forward(self, inputs: dict[str, Tensor], mask: Tensor, keep: Tensor) -> StepOutput:  # type: ignore[override]
        """`inputs`: the clean batch of B items. `mask` bool [B*M, T]: what row b*M + j predicts (mask j of item b).
        `keep` int64 [B*M, K]: the positions that row's student encodes."""
        m = self.num_masks
        x, valid = self.student.embed(**inputs)
        y = self.teacher.targets(inputs, x, valid)  # once per item
        x = x.repeat_interleave(m, 0)
        valid = None if valid is None else valid.repeat_interleave(m, 0)
        h = self.student.encode(x, valid, keep=keep).last_hidden_state
        prefix = h.shape[1] - keep.shape[1]  # image: the CLS token comes first
        visible = F.dropout(h[:, prefix:], self.decoder_spec.input_dropout, self.training)
        rows, cols = mask.nonzero(as_tuple=True)
        if self.loss_spec.head_input == "document":
            pred = self.document_predictions(visible, keep, valid)[rows].float()
        else:
            std = self.decoder_spec.mask_noise_std
            noise = visible.new_empty(h.shape[0], mask.shape[1], h.shape[2]).normal_(0, std)
            features = self.head.features(scatter_positions(visible, keep, mask.shape[1], noise), valid)
            pred = self.head.proj(features[rows, cols]).float()
        target = y[:, y.shape[1] - mask.shape[1]:][torch.div(rows, m, rounding_mode="floor"), cols]
        count = mask.sum()
        loss = regression_loss(pred, target, self.loss_spec).sum() / count.clamp_min(1)
        if self.cls_loss > 0 and prefix:
            # The reference's CLS term (fairseq examples/data2vec/models/data2vec2.py): d2v_loss(CLS output, mean
            # patch target) x cls_loss x sample_size, where sample_size counts the masked positions of all B x M
            # rows; fairseq's criterion sums every term and the trainer divides the gradient by sample_size. So the
            # regression term is a mean over masked positions and the CLS term cls_loss x a SUM over the B x M rows
            # (under DDP: over one rank's rows, 16 x 16 = 256 at the reference image setup, as here at batch 16,
            # M 16).
            cls_target = y[:, prefix:].mean(1).repeat_interleave(m, 0)
            loss = loss + self.cls_loss * regression_loss(h[:, 0].float(), cls_target, self.loss_spec).sum()
        stats = {"target_var": spread(target), "pred_var": spread(pred.detach()), "masked": count.detach()}
        return StepOutput(loss, stats)

    def document_predictions(self, visible: Tensor, keep: Tensor, valid: Tensor | None) -> Tensor:
        """head_input="document" (the short text recipe): one prediction per row, for all its masked positions, from
        the mean of the row's visible, non-padded outputs: the decoder reads a one-position sequence, so no
        position reaches it and the pooled vector itself must say what the masked parts hold. [B*M, D]."""
        seen = torch.ones_like(keep, dtype=visible.dtype) if valid is None else valid.gather(1, keep).to(visible.dtype)
        return self.head(masked_mean(visible, seen).unsqueeze(1))[:, 0]


Objective = Data2Vec2
