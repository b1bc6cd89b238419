"""The model-file contract: one dataclass that the exporter writes and the server reads, version-1 files (written by
the exporter before it) still load with nothing guessed, and bad files fail with one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from d2v.export.metadata import build_metadata
from d2v.training.checkpoint import encoder_config
from d2v_serve.cli import DEMO_MODELS
from d2v_serve.config import ServerConfig
from d2v_serve.models.model_file import ModelFileError, ModelFileMeta, read_metadata
from d2v_serve.models.registry import load_model, runtime_settings, units_per_position
from tests.factories import make_model_file, tiny_checkpoint
from tests.golden_outputs import TINY_MODELS

EARLIER_FILES = sorted(DEMO_MODELS.glob("*.onnx")) + sorted(TINY_MODELS.glob("*.onnx"))  # exporter of 2dbf5b9


@pytest.mark.parametrize("path", EARLIER_FILES, ids=lambda p: p.stem)
def test_files_of_the_earlier_exporter_load_with_every_fact(path: Path) -> None:
    meta = read_metadata(path)
    assert meta.format_version == 1
    config = ServerConfig(device="cpu")
    model = load_model(path, config, runtime_settings(config, 1))
    if meta.modality == "audio":  # computed from the conv layers the file records
        assert (model.meta.conv_stride, model.meta.receptive_field) == (320, 400)
        assert model.meta.representations["target"].poolings == ("none",)
    elif meta.modality == "image":  # not in the file: read from the graph's fixed positions (patches + CLS)
        patches = (model.meta.image_size // model.meta.patch_size) ** 2
        assert model.image_positions == patches + 1 and model.meta.patch_size == 8
        assert units_per_position(model.meta) == 64
    assert set(model.outputs) == {"last", "target"}


@pytest.mark.parametrize("modality", ["audio", "image", "text"])
def test_export_writes_the_contract_the_server_reads(tmp_path: Path, modality: str) -> None:
    ckpt = tiny_checkpoint(modality)
    built = build_metadata(ckpt, encoder_config(ckpt), precision="fp32", checkpoint="a.pt", checkpoint_sha256="0",
                           opset=18, parity={})
    assert isinstance(built, ModelFileMeta) and built.format_version == 2
    assert ModelFileMeta.from_dict(json.loads(json.dumps(built.to_dict()))) == built  # JSON round trip
    meta = read_metadata(make_model_file(modality, tmp_path))
    assert meta.format_version == 2 and meta.to_dict().keys() == built.to_dict().keys()
    if modality == "image":
        assert meta.patch_size == encoder_config(ckpt).patch_size == 8


def test_contract_errors_are_one_line() -> None:
    base = read_metadata(DEMO_MODELS / "demo-audio.onnx").replace(format_version=2).to_dict()
    cases = {
        "conv_stride 160 / receptive_field 400 do not match conv_layers (320 / 400)": {**base, "conv_stride": 160},
        "lacks receptive_field": {k: v for k, v in base.items() if k != "receptive_field"},
        "precision 'fp8' is not one of": {**base, "precision": "fp8"},
        "conv_layers must be": {**base, "conv_layers": [[512, 10]]},
        "malformed d2v metadata": {**base, "hidden_size": "wide"},
    }
    for message, meta in cases.items():
        with pytest.raises(ModelFileError, match=re.escape(message)) as info:
            ModelFileMeta.from_dict(meta, "x.onnx")
        assert "\n" not in str(info.value) and str(info.value).startswith("x.onnx: ")
