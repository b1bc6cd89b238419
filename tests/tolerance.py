"""Tolerances for float32 results that are sums of many terms (matmuls, convolutions, their weight gradients).

Such a sum's rounding error grows with the size of its terms, and the order of summation changes with the thread
count and kernel choice, so a fixed absolute tolerance passes or fails on rounding luck once values are large. Here
the absolute tolerance is a fraction of the tensor's largest magnitude (never below the floor for values near 1).
"""

from __future__ import annotations

import torch


def scaled_atol(expected: torch.Tensor, rel: float, floor: float = 1.0) -> float:
    """`rel` x the largest |value| of `expected` (at least `rel` x `floor`)."""
    return rel * max(floor, float(expected.detach().abs().max())) if expected.numel() else rel


def assert_close_at_scale(got: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5, what: str = "") -> None:
    """|got - expected| <= rel x max(1, max |expected|) everywhere."""
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    atol = scaled_atol(expected, rel)
    diff = float((got - expected).detach().abs().max()) if got.numel() else 0.0
    assert diff <= atol, f"{what}: max abs diff {diff:.3g} > {atol:.3g} ({rel:g} x the largest magnitude)"
