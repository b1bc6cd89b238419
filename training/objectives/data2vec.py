"""data2vec 1.0 (arXiv 2202.03555): one objective for every modality.

The student encodes the masked view; the EMA teacher (objectives/teacher.py) encodes the full clean input, and its
target space at the masked positions is what a small regression head on the student's output must predict. A
modality only says, through `TeacherSpec`, which student parts the teacher leaves out or shares and whether the
teacher re-reads the student's front-end features (audio) or the clean input (image, text).

`REFERENCE` holds the published pretraining configs value for value (docs/objectives.md names each source key);
`RECIPES` holds named recipes for other kinds of runs (docs/research.md gives the evidence for each value).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from ..config import BlockMaskConfig, SpanMaskConfig, TokenMaskConfig, TrainConfig
from ..masking import BatchMasker, TokenMasking
from ..models import EncoderConfig
from .loss import LossSpec, StepOutput, document_inputs, regression_head, regression_loss, spread
from .teacher import StudentTeacher, TeacherSpec

AUDIO_TEACHER = {"drop": ["feature_extractor", "feature_projection", "mask_embedding"],
                 "reads_student_features": True, "mask_param": "mask_embedding"}
TEXT_EMBEDDINGS = ["token_embed", "position_embed", "token_type_embed", "embed_norm"]

# fairseq examples/data2vec/config/{audio/pretraining/base_librispeech, vision/pretraining/base_imagenet_d2v1,
# text/pretraining/base}.yaml and the model dataclasses they leave at their defaults (docs/objectives.md).
REFERENCE: dict[str, dict[str, Any]] = {
    "audio": {
        "masking_type": SpanMaskConfig,
        "steps": 400000, "batch_size": 8,
        "optimizer": {"lr": 5e-4, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.01, "clip_grad": 0.0},
        "schedule": {"name": "tri_stage", "tri_stage": [0.03, 0.90, 0.07], "init_lr_scale": 0.01,
                     "final_lr_scale": 0.01},
        "ema": {"decay": 0.999, "end_decay": 0.9999, "anneal_steps": 30000},
        "loss": {"beta": 0.0, "scale": None, "reduce": "sum", "head_layers": 1},
        "teacher": {**AUDIO_TEACHER, "copy": ["pos_conv"], "target_layers_of_12": 8},
        "masking": {"mask_prob": 0.65, "mask_length": 10, "min_masks": 2, "require_same_masks": True},
        "model": {"layerdrop": 0.05, "target_source": "ffn", "target_norm": "instance", "target_final_norm": False},
        "data": {"max_samples": 320000, "min_samples": 0, "pad_audio": False},
    },
    "image": {
        "masking_type": BlockMaskConfig,
        "steps": 375300, "batch_size": 128,
        "optimizer": {"lr": 5e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.05, "clip_grad": 3.0},
        "schedule": {"name": "cosine", "warmup_steps": 12510, "min_lr_ratio": 0.0},
        "ema": {"decay": 0.999, "end_decay": 0.9998, "anneal_steps": 375300},
        "loss": {"beta": 2.0, "scale": None, "reduce": "sum", "head_layers": 1},
        "teacher": {"mask_param": "mask_token", "target_layers_of_12": 6},
        "masking": {"mask_fraction": 75 / 196, "min_block_patches": 16, "max_block_patches": None,
                    "min_aspect": 0.3, "max_aspect": None},
        "model": {"drop_path": 0.25, "attention_dropout": 0.05, "layer_scale_init": 1e-4, "target_source": "block",
                  "target_norm": "none", "target_final_norm": True},
    },
    "text": {
        "masking_type": TokenMaskConfig,
        "steps": 1000000, "batch_size": 16,
        "optimizer": {"lr": 2e-4, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.01, "clip_grad": 5.0},
        "schedule": {"name": "cosine", "warmup_steps": 10000, "min_lr_ratio": 0.0},
        "ema": {"decay": 0.999, "end_decay": 0.9999, "anneal_steps": 300000},
        "loss": {"beta": 4.0, "scale": 1.0, "reduce": "sum", "head_layers": 2},
        "teacher": {"copy": TEXT_EMBEDDINGS, "target_layers_of_12": 10},
        "masking": {"mask_prob": 0.35, "leave_unmasked_prob": 0.0, "random_token_prob": 0.0, "mask_span": 4},
        "model": {"layerdrop": 0.0, "target_source": "ffn", "target_norm": "layer", "target_final_norm": False},
    },
}

# "short": a few thousand updates of `tiny`/`small` on a small corpus; each value's evidence: docs/research.md.
RECIPES: dict[str, dict[str, dict[str, Any]]] = {"short": {
    "audio": {
        "model": {"layerdrop": 0.0},  # research.md#short-audio: the preset's value when the recipe was measured
        "data": {"max_samples": 250000},  # research.md#short-audio: 15.6 s crops, the loader's default then
    },
    "image": {
        "batch_size": 32,  # research.md#short-image: one CPU's batch in the quality runs
        "optimizer": {"lr": 2e-3},  # research.md#short-image: data2vec_vision's lr (at batch 2048)
        "schedule": {"warmup_steps": None, "warmup_frac": 0.0125, "min_lr_ratio": 0.005},  # research.md#short-image
        "ema": {"decay": 0.9998, "end_decay": 0.9998, "anneal_steps": 0},  # research.md#short-image: constant EMA
        "loss": {"scale": 1.0, "reduce": "mean"},  # research.md#short-image: data2vec_vision's smooth L1 mean
        "masking": {"mask_fraction": 120 / 196},  # research.md#short-image: the paper's 60 % (120 of 196)
        "model": {"attention_dropout": 0.0, "target_norm": "layer"},  # research.md#short-image: data2vec_vision
    },
    "text": {
        "batch_size": 32,  # research.md#short-text: the batch of every screened text run
        "optimizer": {"embed_lr_scale": 15.0},  # research.md#short-text: embeddings at 15x the lr
        "schedule": {"warmup_steps": None, "warmup_frac": 0.01},  # research.md#short-text: 1 % warmup
        "ema": {"decay": 0.99999, "end_decay": 0.99999},  # research.md#short-text: a teacher that stays put
        "loss": {"head_input": "document"},  # research.md#short-text: predict from the visible mean
        "teacher": {"copy": []},  # research.md#short-text: the teacher keeps token embeddings of its own
        "masking": {"mask_prob": 0.5, "leave_unmasked_prob": 0.1, "random_token_prob": 0.1,
                    "mask_span": 1},  # research.md#short-text: half the tokens, BERT's 80/10/10, no spans
    },
}}


class Data2Vec(StudentTeacher):
    predictor = "head"  # the training-only module that maps student outputs to targets (its checkpoint key)

    def __init__(self, student: nn.Module, teacher: TeacherSpec, loss: LossSpec, head: nn.Module | None = None) -> None:
        super().__init__(student, teacher, loss)
        self.head = head if head is not None else regression_head(self.cfg.hidden_size, loss.head_layers)

    @classmethod
    def from_config(cls, student: nn.Module, cfg: TrainConfig) -> Data2Vec:
        return cls(student, teacher_spec(cfg), loss_spec(cfg))

    @staticmethod
    def masker(cfg: TrainConfig, enc: EncoderConfig, preprocessing: Any) -> BatchMasker:
        options = dataclasses.asdict(cfg.masking)
        if cfg.modality != "text":
            return BatchMasker(cfg.modality, options, conv_layers=enc.conv_layers, grid=enc.grid_size)
        m = cfg.masking
        unk = preprocessing.tokenizer.token_to_id("<unk>")
        specials = tuple(i for i in (preprocessing.bos_id, preprocessing.pad_id, preprocessing.eos_id, unk)
                         if i is not None)
        tokens = TokenMasking(preprocessing.mask_id, enc.vocab_size, specials, m.mask_prob, m.leave_unmasked_prob,
                              m.random_token_prob, m.mask_span)
        return BatchMasker(cfg.modality, options, text=tokens)

    def forward(self, inputs: dict[str, Tensor], mask: Tensor,
                student_inputs: dict[str, Tensor] | None = None) -> StepOutput:
        """`inputs`: clean graph inputs (the teacher's view). `mask`: bool [B, T_front], True where the student must
        predict (masked frames / patches / tokens). `student_inputs`: the student's view when masking happens on the
        inputs themselves (text ids); otherwise the student's front-end features are masked here."""
        x, valid = self.student.embed(**(student_inputs if student_inputs is not None else inputs))
        y = self.teacher.targets(inputs, x, valid)
        if self.spec.mask_param is not None:
            fill = getattr(self.student, self.spec.mask_param).to(x.dtype)
            x = torch.where(mask.unsqueeze(-1), fill, x)
        h = self.student.encode(x, valid).last_hidden_state
        prefix = h.shape[1] - mask.shape[1]  # image: the CLS token comes first; patch i is position i + 1
        h, y = self.head_inputs(h[:, prefix:], mask, valid), y[:, prefix:][mask]
        pred = self.head(h).float()
        per_pos = regression_loss(pred, y, self.loss_spec)
        count = mask.sum()
        loss = per_pos.sum() / count.clamp_min(1)
        stats = {"target_var": spread(y), "pred_var": spread(pred.detach()), "masked": count.detach()}
        return StepOutput(loss, stats)

    def head_inputs(self, h: Tensor, mask: Tensor, valid: Tensor | None) -> Tensor:
        """[N, D], one row per masked position. "position" (data2vec): the student's output there. "document": the
        mean of the student's outputs at its item's visible positions, the same row for every masked position of
        the item, so the pooled vector itself must say what the masked parts hold (the short text recipe)."""
        return h[mask] if self.loss_spec.head_input == "position" else document_inputs(h, mask, valid)


def teacher_spec(cfg: TrainConfig) -> TeacherSpec:
    t = cfg.teacher
    return TeacherSpec(tuple(t.drop), tuple(t.copy), t.reads_student_features, t.mask_param)


def loss_spec(cfg: TrainConfig) -> LossSpec:
    s = cfg.loss
    return LossSpec(s.beta, s.scale, s.reduce, s.head_layers, s.head_input)


Objective = Data2Vec
