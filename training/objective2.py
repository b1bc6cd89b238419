"""data2vec 2.0 (arXiv 2212.07525): the same teacher and targets as data2vec, used far more efficiently.

- The EMA teacher encodes each clean item once; its targets serve `num_masks` (M) masked copies of the item.
- The student encodes only the positions each copy keeps visible (a gather: every row keeps the same number, so
  the expanded batch is dense), never a mask token.
- A light conv decoder (1-D over time for audio and text, 2-D over the patch grid for images) gets the student's
  outputs back in place, N(0, mask_noise_std) noise in the removed slots, and predicts the targets at the masked
  positions. It is training-only: checkpoints keep it under `training`, never in the encoder weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models.gather import scatter_positions
from .objective import Data2Vec, LossSpec, StepOutput, TeacherSpec, regression_head, regression_loss, spread
from .pooling import masked_mean


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


class Data2Vec2(Data2Vec):
    predictor = "decoder"

    def __init__(self, student: nn.Module, teacher: TeacherSpec, loss: LossSpec, decoder: DecoderSpec,
                 num_masks: int, cls_loss: float = 0.0) -> None:
        spatial = student.cfg.modality == "image"
        super().__init__(student, teacher, loss, head=ConvDecoder(student.cfg.hidden_size, decoder, spatial))
        self.decoder_spec = decoder
        self.num_masks = int(num_masks)
        self.cls_loss = float(cls_loss)
        if teacher.mask_param is not None:
            # the student never sees a masked position, so its mask embedding gets no gradient: frozen, so that DDP
            # finds every trainable parameter used
            getattr(student, teacher.mask_param).requires_grad_(False)

    def forward(self, inputs: dict[str, Tensor], mask: Tensor, keep: Tensor) -> StepOutput:  # type: ignore[override]
        """`inputs`: the clean batch of B items. `mask` bool [B*M, T]: what row b*M + j predicts (mask j of item b).
        `keep` int64 [B*M, K]: the positions that row's student encodes."""
        m = self.num_masks
        x, valid = self.student.embed(**inputs)
        y = self.targets(inputs, x, valid)  # once per item
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
            # M 16). In a short `tiny` run this term dominates the loss and costs probe accuracy (docs/quality.md,
            # "data2vec 2.0"), hence cls_loss 0 in the defaults.
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
