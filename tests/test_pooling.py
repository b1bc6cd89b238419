"""Mean pooling over valid positions has one numpy home and one torch twin, and they agree."""

from __future__ import annotations

import numpy as np
import torch

from d2v.training.pooling import masked_mean as torch_masked_mean
from d2v_serve.preprocess import masked_mean


def test_torch_twin_equals_the_numpy_mean() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 9, 16))
    mask = rng.random((4, 9)) < 0.6
    mask[1] = False  # no valid position: zeros, not NaN
    mask[2] = True
    expected = masked_mean(x, mask)
    assert expected.dtype == np.float64 and not expected[1].any()
    np.testing.assert_allclose(expected[2], x[2].mean(0), rtol=1e-12)
    np.testing.assert_allclose(expected[0], x[0][mask[0]].mean(0), rtol=1e-12)
    twin = torch_masked_mean(torch.from_numpy(x), torch.from_numpy(mask))
    assert twin.dtype == torch.float64
    np.testing.assert_allclose(twin.numpy(), expected, rtol=1e-12, atol=1e-15)
    single = torch_masked_mean(torch.from_numpy(x).float(), torch.from_numpy(mask))
    assert single.dtype == torch.float32
    np.testing.assert_allclose(single.numpy(), expected, rtol=1e-5, atol=1e-6)
