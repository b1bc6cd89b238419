"""The data2vec objective, one module for every modality.

The student encodes the masked view; the EMA teacher (fp32, eval mode, no gradients) encodes the full clean input
and its target space (`target_representation`: top-K layer outputs, normalised, averaged) at the masked positions
is what a small regression head on the student's output must predict. A modality only says, through `TeacherSpec`,
which student parts the teacher leaves out or shares and whether the teacher re-reads the student's front-end
features (audio) or the clean input (image, text).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .defaults import HEAD_INPUTS
from .ema import EMATeacher
from .pooling import masked_mean
from .targets import target_representation

VAR_EPS = 1e-6


@dataclass(frozen=True)
class TeacherSpec:
    drop: tuple[str, ...] = ()  # student submodules the teacher does not have (audio: CNN, projection)
    copy: tuple[str, ...] = ()  # student parameters the teacher shares (copied, not averaged)
    reads_student_features: bool = False  # True: teacher.encode(student front-end features, detached)
    mask_param: str | None = None  # student parameter written into masked front-end positions (None: text ids)


@dataclass(frozen=True)
class LossSpec:
    beta: float = 0.0  # 0: squared error; > 0: smooth L1 with this beta
    scale: float | None = None  # None: 1 / sqrt(D)
    reduce: str = "sum"  # over dims per position: "sum" or "mean"
    head_layers: int = 1  # 1: Linear(D, D); 2: Linear(D, 2D) -> GELU -> Linear(2D, D)
    head_input: str = "position"  # what the head reads for a masked position: see Data2Vec.head_inputs


@dataclass
class StepOutput:
    loss: Tensor  # scalar, mean over masked positions (what backward sees)
    stats: dict[str, Tensor] = field(default_factory=dict)  # detached scalars: target_var, pred_var, masked


def regression_head(dim: int, layers: int, out_dim: int | None = None) -> nn.Module:
    out_dim = dim if out_dim is None else out_dim
    if layers <= 1:
        return nn.Linear(dim, out_dim)
    blocks: list[nn.Module] = [nn.Linear(dim, 2 * dim), nn.GELU()]
    for _ in range(layers - 2):
        blocks += [nn.Linear(2 * dim, 2 * dim), nn.GELU()]
    return nn.Sequential(*blocks, nn.Linear(2 * dim, out_dim))


def spread(x: Tensor) -> Tensor:
    """Collapse monitor: mean over dims of sqrt(var over tokens + 1e-6). x [N, D]."""
    x = x.float()
    centred = x - x.mean(0)  # written out: 2x faster than var(dim=0) over many rows on CPU
    return torch.sqrt((centred * centred).sum(0) / (len(x) - 1) + VAR_EPS).mean()


def regression_loss(pred: Tensor, target: Tensor, spec: LossSpec) -> Tensor:
    """Per-position loss [N]: squared error or smooth L1, summed (or averaged) over dims, times the scale."""
    if spec.beta == 0:
        per_dim = F.mse_loss(pred, target, reduction="none")
    else:
        per_dim = F.smooth_l1_loss(pred, target, reduction="none", beta=spec.beta)
    per_pos = per_dim.sum(-1) if spec.reduce == "sum" else per_dim.mean(-1)
    scale = spec.scale if spec.scale is not None else 1.0 / math.sqrt(pred.shape[-1])
    return per_pos * scale


def document_inputs(h: Tensor, mask: Tensor, valid: Tensor | None) -> Tensor:
    """[N, D]: for each masked position (row-major), the mean of h over its item's visible, non-padded positions."""
    seen = ~mask if valid is None else valid & ~mask
    return masked_mean(h, seen)[mask.nonzero(as_tuple=True)[0]]


class Data2Vec(nn.Module):
    predictor = "head"  # the training-only module that maps student outputs to targets (its checkpoint key)

    def __init__(self, student: nn.Module, teacher: TeacherSpec, loss: LossSpec, head: nn.Module | None = None) -> None:
        super().__init__()
        if loss.reduce not in ("sum", "mean"):
            raise ValueError(f"loss reduce must be 'sum' or 'mean', got {loss.reduce!r}")
        if loss.head_input not in HEAD_INPUTS:
            raise ValueError(f"head_input must be one of {', '.join(HEAD_INPUTS)}, got {loss.head_input!r}")
        self.student = student
        self.cfg = student.cfg
        self.spec = teacher
        self.loss_spec = loss
        self.teacher = EMATeacher(student, drop=teacher.drop, copy_params=teacher.copy)
        self.head = head if head is not None else regression_head(self.cfg.hidden_size, loss.head_layers)

    @torch.no_grad()
    def targets(self, inputs: dict[str, Tensor], features: Tensor, valid: Tensor | None) -> Tensor:
        """Teacher target space [B, T, D] in fp32 on the clean input."""
        with torch.autocast(features.device.type, enabled=False):
            if self.spec.reads_student_features:
                out = self.teacher.model.encode(features.detach().float(), valid)
            else:
                out = self.teacher.model(**inputs)
            return target_representation(out, self.cfg)

    def forward(self, inputs: dict[str, Tensor], mask: Tensor,
                student_inputs: dict[str, Tensor] | None = None) -> StepOutput:
        """`inputs`: clean graph inputs (the teacher's view). `mask`: bool [B, T_front], True where the student must
        predict (masked frames / patches / tokens). `student_inputs`: the student's view when masking happens on the
        inputs themselves (text ids); otherwise the student's front-end features are masked here."""
        x, valid = self.student.embed(**(student_inputs if student_inputs is not None else inputs))
        y = self.targets(inputs, x, valid)
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

    @torch.no_grad()
    def update_teacher(self, decay: float) -> None:
        self.teacher.update(self.student, decay)

    def training_state(self) -> dict[str, Any]:
        return {"teacher": self.teacher.model.state_dict(), self.predictor: self.head.state_dict()}

    def load_training_state(self, training: dict[str, Any]) -> None:
        self.teacher.model.load_state_dict(training["teacher"])
        self.head.load_state_dict(training[self.predictor])
