"""Outputs stay bit-identical: every output kind of the demo models and of tiny model files written by an earlier
exporter, over gRPC and HTTP, against the arrays recorded in tests/data/golden/outputs.npz (tests/golden_outputs.py
says how they were made). Bit for bit where the runtime, numpy and the CPU's vector units are those of the
recording; elsewhere ONNX Runtime may pick other kernels, and the floats are held to 1e-5 (float16: one unit in the
last place) instead."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.golden_outputs import ENVIRONMENT, OUTPUTS, environment, fold, models_dir, record, served_models
from tests.serve_fixtures import ServerThread, free_port


def _same(got: np.ndarray, want: np.ndarray, exact: bool) -> bool:
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    if exact or want.dtype.kind not in "f":
        return got.tobytes() == want.tobytes()
    tol = 2e-3 if want.dtype == np.float16 else 1e-5  # float16: one unit in the last place
    return bool(np.allclose(got.astype(np.float64), want.astype(np.float64), rtol=tol, atol=tol))


def test_every_output_kind_is_bit_identical_to_the_recording(tmp_path: Path) -> None:
    golden = np.load(OUTPUTS)
    exact = str(golden[ENVIRONMENT]) == environment()
    with ServerThread(models_dir(tmp_path / "models"), http_port=free_port()) as server:
        got = fold(record(server.target, server.http_url, served_models()))
    names = sorted(k for k in golden.files if k != ENVIRONMENT)
    assert sorted(got) == names, "different outputs (or HTTP parted from gRPC)"
    differ = [k for k in names if not _same(got[k], golden[k], exact)]
    assert not differ, f"{len(differ)} outputs changed ({'bit for bit' if exact else 'beyond the tolerance'}), " \
                       f"e.g. {differ[:5]}"
