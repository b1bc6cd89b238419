"""The EMA teacher and its targets, shared by both objectives, and the student-teacher base they build on.

The teacher is a frozen fp32 copy of (part of) the student, always in eval mode, moved towards the student after
every optimizer step: theta_t = tau * theta_t + (1 - tau) * theta_s. Parameters named by `copy` are shared (copied
from the student instead of averaged); submodules named by `drop` are not part of the teacher at all. Its targets are
the data2vec target space (training/targets.py: top-K layer outputs, normalised, averaged) of the clean input, or of
the student's front-end features where the teacher has no front end of its own (audio).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..targets import target_representation
from .optim import adamw

if TYPE_CHECKING:
    from ..config import TrainConfig


@dataclass(frozen=True)
class TeacherSpec:
    drop: tuple[str, ...] = ()  # student submodules the teacher does not have (audio: CNN, projection)
    copy: tuple[str, ...] = ()  # student parameters the teacher shares (copied, not averaged)
    reads_student_features: bool = False  # True: teacher.encode(student front-end features, detached)
    mask_param: str | None = None  # student parameter written into masked front-end positions (None: text ids)


class EMATeacher(nn.Module):
    def __init__(self, student: nn.Module, spec: TeacherSpec = TeacherSpec()) -> None:
        super().__init__()
        self.spec = spec
        model = copy.deepcopy(student)
        for name in spec.drop:
            parent, _, leaf = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            if not hasattr(owner, leaf):
                raise ValueError(f"teacher: the student has no part named {name!r} to leave out")
            delattr(owner, leaf)
        self.model = model.float().requires_grad_(False).eval()
        self.copy_prefixes = tuple(f"{p}." if not p.endswith(".") else p for p in spec.copy)
        names = dict(self.model.named_parameters())
        for p in self.copy_prefixes:
            if not any(n.startswith(p) for n in names):
                raise ValueError(f"teacher: no parameters under {p.rstrip('.')!r} to share with the student")

    def train(self, mode: bool = True) -> EMATeacher:
        """The teacher never leaves eval mode: no dropout, no layerdrop, no drop path."""
        super().train(mode)
        self.model.eval()
        return self

    def is_copied(self, name: str) -> bool:
        return name.startswith(self.copy_prefixes)

    @torch.no_grad()
    def targets(self, inputs: dict[str, Tensor], features: Tensor, valid: Tensor | None) -> Tensor:
        """The target space [B, T, D] in fp32: of the clean input, or of the student's front-end features."""
        with torch.autocast(features.device.type, enabled=False):
            if self.spec.reads_student_features:
                out = self.model.encode(features.detach().float(), valid)
            else:
                out = self.model(**inputs)
            return target_representation(out, self.model.cfg)

    @torch.no_grad()
    def update(self, student: nn.Module, decay: float) -> None:
        """One EMA step towards `student` (the bare module, not a DDP wrapper)."""
        source = dict(student.named_parameters())
        averaged, targets = [], []
        for name, p in self.model.named_parameters():
            s = source[name].detach()
            if self.is_copied(name):
                p.copy_(s)
            elif decay < 1.0:
                averaged.append(p)
                targets.append(s.to(p.dtype))
        if averaged:
            torch._foreach_mul_(averaged, decay)
            torch._foreach_add_(averaged, targets, alpha=1.0 - decay)
        student_buffers = dict(student.named_buffers())
        for name, b in self.model.named_buffers():
            if name in student_buffers:
                b.copy_(student_buffers[name])


class StudentTeacher(nn.Module):
    """What both objectives hold: the student, its EMA teacher and a training-only predictor (`head`: data2vec's
    regression head, data2vec2's decoder), saved under the checkpoint key `predictor`. Each objective adds its own
    `forward`, `from_config` and `masker`."""

    predictor = "head"
    head: nn.Module

    def __init__(self, student: nn.Module, teacher: TeacherSpec, loss: Any) -> None:
        super().__init__()
        self.student = student
        self.cfg = student.cfg
        self.spec = teacher
        self.loss_spec = loss
        self.teacher = EMATeacher(student, teacher)

    def configure_optimizer(self, cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters (objectives/optim.py); the text token embeddings in a group of their
        own when `optimizer.embed_lr_scale` is not 1."""
        faster = self.student.token_embed.weight if cfg.optimizer.embed_lr_scale != 1.0 else None
        return adamw(self, cfg.optimizer, device_type, faster)

    @torch.no_grad()
    def update_teacher(self, decay: float) -> None:
        self.teacher.update(self.student, decay)

    def training_state(self) -> dict[str, Any]:
        return {"teacher": self.teacher.model.state_dict(), self.predictor: self.head.state_dict()}

    def load_training_state(self, training: dict[str, Any]) -> None:
        self.teacher.model.load_state_dict(training["teacher"])
        self.head.load_state_dict(training[self.predictor])
