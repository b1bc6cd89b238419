"""Outputs stay bit-identical: every output kind of the demo models and of tiny model files written by an earlier
exporter, over gRPC and HTTP, against the arrays recorded in tests/data/golden/outputs.npz (tests/golden_outputs.py
says how they were made)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.golden_outputs import OUTPUTS, fold, models_dir, record, served_models
from tests.serve_fixtures import ServerThread, free_port


def test_every_output_kind_is_bit_identical_to_the_recording(tmp_path: Path) -> None:
    golden = np.load(OUTPUTS)
    with ServerThread(models_dir(tmp_path / "models"), http_port=free_port()) as server:
        got = fold(record(server.target, server.http_url, served_models()))
    assert sorted(got) == sorted(golden.files), "different outputs (or HTTP parted from gRPC)"
    differ = [k for k in golden.files
              if got[k].dtype != golden[k].dtype or got[k].shape != golden[k].shape
              or got[k].tobytes() != golden[k].tobytes()]
    assert not differ, f"{len(differ)} outputs changed, e.g. {differ[:5]}"
