"""Masks for the data2vec student, one generator per modality, all driven by a seeded numpy Generator.

- audio: fairseq's span masking (`compute_mask_indices`, static lengths, `require_same_masks`): spans of
  `mask_length` frames start at `mask_prob * frames / mask_length` random positions of each item's valid frames;
  every item of a batch then keeps the same number of masked frames (the batch minimum).
- image: BEiT block masking: rectangles of `min_block..max_block` patches with a random aspect ratio until exactly
  `num_mask_patches` patches are masked.
- text: BERT masking of `mask_prob` of the real tokens (never <s>, </s>, <pad>), optionally in spans; of the chosen
  tokens 80% become <mask>, 10% a random token, 10% stay. The loss covers every chosen token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from d2v_serve.preprocess import audio_frames


@dataclass(frozen=True)
class SpanMasking:
    mask_prob: float = 0.65
    mask_length: int = 10
    min_masks: int = 2
    require_same_masks: bool = True

    def __call__(self, lengths: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
        """Valid frame count per item and the padded frame count -> bool [B, total] (True = masked)."""
        per_item = [self._item(int(n), rng) for n in lengths]
        keep = min(len(m) for m in per_item) if self.require_same_masks else None
        mask = np.zeros((len(per_item), total), dtype=bool)
        for row, idc in zip(mask, per_item, strict=True):
            if keep is not None and len(idc) > keep:
                idc = rng.choice(idc, keep, replace=False)
            row[idc] = True
        return mask

    def _item(self, size: int, rng: np.random.Generator) -> np.ndarray:
        num = max(self.min_masks, int(self.mask_prob * size / float(self.mask_length) + rng.random()))
        span = self.mask_length
        if size - span <= num:  # short item: as fairseq, leave num + 1 possible starts
            span = size - num - 1
        starts = rng.choice(size - span, num, replace=False)
        idc = (starts[:, None] + np.arange(self.mask_length)[None, :]).reshape(-1)
        return np.unique(idc[idc < size])


@dataclass(frozen=True)
class BlockMasking:
    num_mask_patches: int
    min_block_patches: int = 16
    max_block_patches: int | None = None
    min_aspect: float = 0.3
    max_aspect: float | None = None

    def __call__(self, grid: int, batch: int, rng: np.random.Generator) -> np.ndarray:
        """bool [B, grid*grid] in row-major patch order, exactly `num_mask_patches` True per row."""
        if not 0 <= self.num_mask_patches <= grid * grid:
            raise ValueError(f"num_mask_patches must be in 0..{grid * grid}, got {self.num_mask_patches}")
        return np.stack([self._one(grid, rng).reshape(-1) for _ in range(batch)])

    def _one(self, grid: int, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros((grid, grid), dtype=bool)
        target = self.num_mask_patches
        max_block = target if self.max_block_patches is None else self.max_block_patches
        log_aspect = (math.log(self.min_aspect), math.log(self.max_aspect or 1 / self.min_aspect))
        count = 0
        while count < target:
            added = self._block(mask, grid, min(target - count, max_block), log_aspect, rng)
            if added == 0:
                break
            count += added
        if count < target:  # BEiT's generator can stall a few patches short; finish with single patches
            free = np.flatnonzero(~mask.reshape(-1))
            mask.reshape(-1)[rng.choice(free, target - count, replace=False)] = True
        return mask

    def _block(self, mask: np.ndarray, grid: int, room: int, log_aspect: tuple[float, float],
               rng: np.random.Generator) -> int:
        for _ in range(10):
            area = self.min_block_patches + (room - self.min_block_patches) * rng.random()  # room may be smaller
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if 0 < w < grid and 0 < h < grid:
                top = int(rng.integers(0, grid - h + 1))
                left = int(rng.integers(0, grid - w + 1))
                window = mask[top: top + h, left: left + w]
                new = h * w - int(window.sum())
                if 0 < new <= room:
                    window[...] = True
                    return new
        return 0


@dataclass(frozen=True)
class TokenMasking:
    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...]
    mask_prob: float = 0.15
    leave_unmasked_prob: float = 0.1
    random_token_prob: float = 0.1
    mask_span: int = 1

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """-> (student ids, bool [B, T] positions to predict). The clean ids stay untouched for the teacher."""
        specials = np.isin(input_ids, np.asarray(self.special_ids + (self.mask_id,)))
        candidate = attention_mask.astype(bool) & ~specials
        target = np.zeros_like(candidate)
        for row, cand in zip(target, candidate, strict=True):
            row[self._choose(np.flatnonzero(cand), rng)] = True
        draw = rng.random(target.shape)
        keep = target & (draw < self.leave_unmasked_prob)
        rand = target & (draw >= self.leave_unmasked_prob) & (draw < self.leave_unmasked_prob + self.random_token_prob)
        ids = input_ids.copy()
        ids[target & ~keep & ~rand] = self.mask_id
        if rand.any():
            ids[rand] = rng.choice(self._random_pool(), int(rand.sum()))
        return ids, target

    def _choose(self, positions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n = len(positions)
        if n == 0:
            return positions
        num = max(1, int(self.mask_prob * n / self.mask_span + rng.random()))
        starts = rng.choice(n, min(num, n), replace=False)
        picked = (starts[:, None] + np.arange(self.mask_span)[None, :]).reshape(-1)
        return positions[np.unique(picked[picked < n])]

    def _random_pool(self) -> np.ndarray:
        pool = np.ones(self.vocab_size, dtype=bool)
        pool[[i for i in self.special_ids + (self.mask_id,) if 0 <= i < self.vocab_size]] = False
        return np.flatnonzero(pool)


class BatchMasker:
    """A collated numpy batch -> what the objective takes: clean `inputs` (the teacher's view), `mask` (bool, positions
    the student predicts: frames / patches / tokens) and, for text, the student's corrupted `student_inputs`."""

    def __init__(self, modality: str, options: dict[str, Any], conv_layers: list[list[int]] | None = None,
                 grid: int | None = None, text: TokenMasking | None = None) -> None:
        self.modality = modality
        if modality == "audio":
            self.conv_layers = conv_layers
            self.spans = SpanMasking(float(options["mask_prob"]), int(options["mask_length"]),
                                     int(options["min_masks"]), bool(options["require_same_masks"]))
        elif modality == "image":
            self.grid = int(grid)
            self.blocks = BlockMasking(int(options["num_mask_patches"]), int(options["min_block_patches"]),
                                       options["max_block_patches"], float(options["min_aspect"]),
                                       options["max_aspect"])
        elif modality == "text":
            if text is None:
                raise ValueError("text masking needs a TokenMasking")
            self.tokens = text
        else:
            raise ValueError(f"unknown modality {modality!r}")

    def __call__(self, batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, Any]:
        if self.modality == "audio":
            samples = batch["attention_mask"].sum(1)
            total = int(audio_frames(batch["input_values"].shape[1], self.conv_layers))
            mask = self.spans(audio_frames(samples, self.conv_layers), total, rng)
            return {"inputs": batch, "mask": mask}
        if self.modality == "image":
            return {"inputs": batch, "mask": self.blocks(self.grid, len(batch["pixel_values"]), rng)}
        ids, mask = self.tokens(batch["input_ids"], batch["attention_mask"], rng)
        return {"inputs": batch, "mask": mask,
                "student_inputs": {"input_ids": ids, "attention_mask": batch["attention_mask"]}}


# ------------------------------------------------------------------------------------------------ data2vec 2.0


def exact_block_mask(size: int, count: int, block: int, rng: np.random.Generator) -> np.ndarray:
    """bool [size] with exactly `count` True, in non-overlapping blocks of `block` (one shorter block takes the
    remainder); adjacent blocks may touch. Uniform over arrangements: the free positions are split by stars and bars."""
    lengths = np.full(count // block + (1 if count % block else 0), block, dtype=np.int64)
    if count % block:
        lengths[-1] = count % block
    rng.shuffle(lengths)
    slots = np.sort(rng.choice(size - count + len(lengths), len(lengths), replace=False))
    placed = np.cumsum(lengths) - lengths  # block lengths before each block
    begins = slots - np.arange(len(lengths)) + placed  # free positions before the block + the blocks before it
    mask = np.zeros(size, dtype=bool)
    mask[np.repeat(begins - placed, lengths) + np.arange(count)] = True
    return mask


def inverse_block_mask(grid: int, keep: int, block: int, rng: np.random.Generator) -> np.ndarray:
    """bool [grid * grid], True = masked: exactly `keep` patches stay visible, as square blocks of `block` x `block`
    around random centres (clipped at the border); the last block gives up random patches to hit `keep` exactly."""
    kept = np.zeros((grid, grid), dtype=bool)
    count = 0
    low, high = (block - 1) // 2, block // 2 + 1
    while count < keep:
        r, c = (int(v) for v in rng.integers(0, grid, 2))
        window = kept[max(0, r - low): r + high, max(0, c - low): c + high]
        new = np.flatnonzero(~window.reshape(-1))
        if len(new) == 0:
            continue
        if count + len(new) > keep:
            new = rng.choice(new, keep - count, replace=False)
        flat = window.reshape(-1).copy()
        flat[new] = True
        window[...] = flat.reshape(window.shape)
        count += len(new)
    return ~kept.reshape(-1)


def visible_positions(mask: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """mask / valid bool [N, T] -> int64 [N, K], the positions the student encodes, ascending: the unmasked valid
    positions, then padded ones, so that every row keeps the same K = T - (most masked in a row). A row with fewer
    masked positions also leaves out some of its padding (never a valid position)."""
    k = mask.shape[1] - int(mask.sum(1).max(initial=0))
    if (mask & ~valid).any() or ((valid & ~mask).sum(1) > k).any():
        raise ValueError("masks must cover valid positions only, and leave no row more than the batch can keep")
    rank = np.where(mask, 2, np.where(valid, 0, 1))  # unmasked valid first, then padding, masked last
    return np.sort(np.argsort(rank, axis=1, kind="stable")[:, :k], axis=1).astype(np.int64)


class MultiMasker:
    """data2vec 2.0: `num_masks` masks per item, rows b * M + j of the expanded batch. Returns clean `inputs`,
    `mask` (bool [B*M, T], the positions to predict) and `keep` (int64 [B*M, K], the positions the student encodes).

    - audio: blocks of `mask_length` frames, exactly round(mask_prob * valid frames) masked per item
    - image: inverse block masking, exactly `keep_patches` patches kept in `keep_block` x `keep_block` blocks
    - text: exactly round(mask_prob * real tokens) random tokens (`mask_length` 1), <s> and </s> included
    """

    def __init__(self, modality: str, options: dict[str, Any], conv_layers: list[list[int]] | None = None,
                 grid: int | None = None) -> None:
        self.modality = modality
        self.num_masks = int(options["num_masks"])
        if self.num_masks < 1:
            raise ValueError(f"masking.num_masks must be >= 1, got {self.num_masks}")
        if modality == "image":
            self.grid, self.keep, self.block = int(grid), int(options["keep_patches"]), int(options["keep_block"])
            if not 1 <= self.keep <= self.grid ** 2:
                raise ValueError(f"masking.keep_patches must be in 1..{self.grid ** 2}, got {self.keep}")
        else:
            self.conv_layers = conv_layers
            self.rate, self.length = float(options["mask_prob"]), int(options["mask_length"])
            if not 0 < self.rate < 1 or self.length < 1:
                raise ValueError(f"masking.mask_prob must be in (0, 1) and mask_length >= 1, got {self.rate}, "
                                 f"{self.length}")

    def __call__(self, batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, Any]:
        m = self.num_masks
        if self.modality == "image":
            rows = len(batch["pixel_values"]) * m
            mask = np.stack([inverse_block_mask(self.grid, self.keep, self.block, rng) for _ in range(rows)])
            return {"inputs": batch, "mask": mask, "keep": visible_positions(mask, np.ones_like(mask))}
        if self.modality == "audio":
            total = int(audio_frames(batch["input_values"].shape[1], self.conv_layers))
            lengths = audio_frames(batch["attention_mask"].sum(1), self.conv_layers)
            valid = np.arange(total)[None, :] < np.asarray(lengths)[:, None]
        else:
            valid = batch["attention_mask"].astype(bool)
        valid = np.repeat(valid, m, axis=0)
        mask = np.zeros_like(valid)
        for row, v in zip(mask, valid, strict=True):
            where = np.flatnonzero(v)
            row[where] = exact_block_mask(len(where), round(self.rate * len(where)), self.length, rng)
        return {"inputs": batch, "mask": mask, "keep": visible_positions(mask, valid)}
