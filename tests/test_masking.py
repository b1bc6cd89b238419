from __future__ import annotations

import numpy as np
import pytest

from d2v.training.masking import BatchMasker, BlockMasking, SpanMasking, TokenMasking
from d2v_serve.preprocess import audio_frames


def test_audio_span_masking_covers_about_half_and_same_count_per_item():
    rng = np.random.default_rng(0)
    masker = SpanMasking(mask_prob=0.65, mask_length=10, min_masks=2)
    fractions = []
    for _ in range(50):
        mask = masker(np.full(8, 2000), 2000, rng)
        counts = mask.sum(1)
        assert len(set(counts.tolist())) == 1  # require_same_masks
        fractions.append(counts[0] / 2000)
    # the batch minimum (require_same_masks) takes a little off the per-item ~49%
    assert 0.45 < np.mean(fractions) < 0.49
    single = np.mean([masker(np.array([2000]), 2000, rng).mean() for _ in range(300)])
    assert abs(single - 0.49) < 0.01  # the paper's "~49% of frames masked" at p=0.65, span 10


def test_audio_masks_stay_on_valid_frames_of_padded_items():
    rng = np.random.default_rng(1)
    lengths = np.array([300, 120, 49, 200])
    mask = SpanMasking()(lengths, 300, rng)
    assert len(set(mask.sum(1).tolist())) == 1
    for row, n in zip(mask, lengths, strict=True):
        assert not row[n:].any() and row[:n].any()


def test_audio_batch_masker_counts_frames_from_samples():
    conv = [[8, 10, 5]] + [[8, 3, 2]] * 4 + [[8, 2, 2]] * 2
    masker = BatchMasker("audio", {"mask_prob": 0.65, "mask_length": 10, "min_masks": 2,
                                   "require_same_masks": True}, conv_layers=conv)
    samples = np.array([32000, 16000])
    attention = (np.arange(32000)[None, :] < samples[:, None]).astype(np.int64)
    out = masker({"input_values": np.zeros((2, 32000), np.float32), "attention_mask": attention},
                 np.random.default_rng(0))
    frames = audio_frames(samples, conv)
    assert out["mask"].shape == (2, frames[0])
    assert not out["mask"][1, frames[1]:].any()


@pytest.mark.parametrize(("grid", "count"), [(14, 120), (8, 39), (4, 16)])
def test_image_block_masking_masks_exactly_the_configured_count(grid, count):
    rng = np.random.default_rng(2)
    mask = BlockMasking(num_mask_patches=count, min_block_patches=16)(grid, 64, rng)
    assert mask.shape == (64, grid * grid)
    assert (mask.sum(1) == count).all()


def test_image_block_masking_makes_blocks_not_scattered_patches():
    mask = BlockMasking(num_mask_patches=120, min_block_patches=16)(14, 32, np.random.default_rng(3))
    mask = mask.reshape(-1, 14, 14)
    # a masked patch in a block mostly has masked neighbours; scattered random patches have ~60% masked neighbours
    right = (mask[:, :, :-1] & mask[:, :, 1:]).sum() / mask[:, :, :-1].sum()
    assert right > 0.8


def _token_batch(rng: np.random.Generator, batch: int = 64, length: int = 200):
    lengths = rng.integers(length // 2, length, batch)
    ids = np.full((batch, length), 1, dtype=np.int64)  # <pad> = 1
    for row, n in zip(ids, lengths, strict=True):
        row[0], row[1:n - 1], row[n - 1] = 0, rng.integers(5, 500, n - 2), 2
    attention = (ids != 1).astype(np.int64)
    return ids, attention


def test_text_masking_is_15_percent_with_80_10_10_and_never_touches_specials():
    rng = np.random.default_rng(4)
    ids, attention = _token_batch(rng)
    masker = TokenMasking(mask_id=500, vocab_size=501, special_ids=(0, 1, 2, 3))
    student, target = masker(ids, attention, rng)
    content = attention.astype(bool) & (ids > 3)
    assert not target[~content].any()  # never <s>, </s> or padding
    assert (student[~content] == ids[~content]).all()
    assert abs(target.sum() / content.sum() - 0.15) < 0.01
    chosen = student[target]
    as_mask = (chosen == 500).mean()
    changed = ((chosen != ids[target]) & (chosen != 500)).mean()
    kept = (chosen == ids[target]).mean()
    assert abs(as_mask - 0.8) < 0.02 and abs(changed - 0.1) < 0.02 and abs(kept - 0.1) < 0.02
    assert not np.isin(student[target & (student != 500)], [0, 1, 2, 3]).any()  # random tokens are not specials


def test_text_span_masking_masks_runs():
    rng = np.random.default_rng(5)
    ids, attention = _token_batch(rng)
    masker = TokenMasking(mask_id=500, vocab_size=501, special_ids=(0, 1, 2, 3), mask_prob=0.35, mask_span=4)
    _, target = masker(ids, attention, rng)
    content = attention.astype(bool) & (ids > 3)
    assert 0.25 < target.sum() / content.sum() < 0.35  # overlapping spans cover a bit less than 35%
    starts = target[:, 1:] & ~target[:, :-1]
    assert target.sum() / starts.sum() > 3  # mean run length near 4


def test_masks_are_reproducible_from_the_seed():
    a = SpanMasking()(np.array([500, 400]), 500, np.random.default_rng([1, 2, 3]))
    b = SpanMasking()(np.array([500, 400]), 500, np.random.default_rng([1, 2, 3]))
    assert (a == b).all()
