"""The typed training config: the reference transcription (docs/objectives.md), the short recipe as main trained
before the defaults became the reference, legacy checkpoints, and one-line errors."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from d2v.training.checkpoint import load_checkpoint, save_checkpoint
from d2v.training.cli import main
from d2v.training.config import (
    LEGACY_KEYS,
    canonical,
    merge,
    recipe_warnings,
    reference_dict,
    resolve_config,
    resolve_derived,
)
from tests.test_train import args_for, read_metrics, write_audio, write_corpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("config_data")
    return {"audio": write_audio(root / "wav"), "text": write_corpus(root / "corpus.txt")}


ROW = re.compile(r"^\| (audio|image|text) \| ([\w.]+) \| (.+?) \| (.+) \|$")


def transcription() -> dict[str, list[tuple[str, str, object]]]:
    """docs/objectives.md's rows per objective: (modality, key path, value)."""
    tables: dict[str, list[tuple[str, str, object]]] = {}
    objective = None
    for line in (ROOT / "docs" / "objectives.md").read_text(encoding="utf-8").splitlines():
        heading = re.match(r"^## (data2vec2?) ", line)
        if heading:
            objective = heading.group(1)
        elif line.startswith("## "):
            objective = None
        match = ROW.match(line)
        if objective and match:
            tables.setdefault(objective, []).append((match[1], match[2], json.loads(match[3])))
    return tables


def lookup(cfg: dict, path: str):
    for part in path.split("."):
        cfg = cfg[part]
    return cfg


@pytest.mark.parametrize("objective", ["data2vec", "data2vec2"])
def test_base_defaults_are_the_reference_transcription(objective):
    rows = transcription()[objective]
    assert {m for m, _, _ in rows} == {"audio", "image", "text"} and len(rows) > 60
    for modality in ("audio", "image", "text"):
        cfg = resolve_derived(resolve_config(modality, objective, layers=[{"preset": "base"}]), 768, 196).to_dict()
        model = cfg["model"]
        for m, key, value in rows:
            if m != modality:
                continue
            if key.startswith("model.") and key[6:] not in model:  # the preset's value (EncoderConfig)
                from d2v.training.models import EncoderConfig

                got = getattr(EncoderConfig.preset(modality, "base"), key[6:])
            else:
                got = lookup(cfg, key)
            if isinstance(value, float) and isinstance(got, float):
                assert math.isclose(got, value, rel_tol=1e-12), (modality, key, got, value)
            else:
                assert got == value, (modality, key, got, value)


def test_top_k_decoder_and_masks_scale_with_the_preset():
    cfg = resolve_derived(resolve_config("image", "data2vec2"), 64, 64)
    assert cfg.decoder.dim == 64 and cfg.masking.keep_patches == 13 and cfg.optimizer.lr == 1e-3  # lr unscaled
    assert resolve_derived(resolve_config("image"), 64, 64).masking.num_mask_patches == 24


@pytest.mark.parametrize("modality", ["audio", "image", "text"])
@pytest.mark.parametrize("objective", ["data2vec", "data2vec2"])
def test_short_recipe_holds_the_values_main_trained_with(modality, objective):
    """tests/short_recipe_at_2dbf5b9.json: `defaults(modality, objective, "short")` at 2dbf5b9, when the tuned values
    were the defaults. The recipe resolves to the same values (steps aside: they were required then), so the same
    seed trains the same weights: checked bitwise once for all six pairs (tiny, 3 updates, the report of issue 30)."""
    old = json.loads((ROOT / "tests" / "short_recipe_at_2dbf5b9.json").read_text())[f"{modality}-{objective}"]
    old = canonical(old)
    if not old["decoder"]:
        old.pop("decoder")
    k = {"audio": 8, "image": 6, "text": 10}[modality]
    old["teacher"]["target_layers_of_12"] = old["teacher"].get("target_layers_of_12") or k
    if old["masking"].get("num_mask_patches", 0) is None:
        old["masking"]["mask_fraction"] = 120 / 196  # what None meant then
    from d2v.training.models import EncoderConfig

    preset = EncoderConfig.preset(modality, "tiny")
    new = resolve_config(modality, objective, "short").to_dict()
    for key in new["model"]:  # the preset's values, which the old table left unnamed
        old["model"].setdefault(key, getattr(preset, key))
    expected = merge(reference_dict(modality, objective), old)
    expected["steps"] = new["steps"]
    assert new == expected


def test_short_recipe_warnings():
    assert recipe_warnings(resolve_config("text", recipe="short", layers=[{"steps": 5000}])) == []
    warned = recipe_warnings(resolve_config("audio", "data2vec2", "short", [{"preset": "base", "steps": 60000}]))
    assert len(warned) == 2
    assert recipe_warnings(resolve_config("audio", layers=[{"preset": "base", "steps": 60000}])) == []


def test_a_checkpoint_from_before_the_typed_config_resumes_bitwise(tmp_path, data):
    """A run stopped at 2 and resumed from a checkpoint whose config is rewritten in the old flat layout ends
    exactly as the same run resumed from the checkpoint as written."""
    extra = ("--objective", "data2vec2", "--set", "masking.num_masks=2")
    assert main(args_for("audio", data, tmp_path / "a", 4, *extra, "--set", "stop_at=2")) == 0
    old = tmp_path / "old"
    old.mkdir()
    ckpt = load_checkpoint(tmp_path / "a" / "ckpt.pt")
    cfg = ckpt["training"].pop("config_version") and ckpt["training"]["config"]
    flat = {k: v for k, v in cfg.items() if not isinstance(v, dict) or k in ("teacher", "masking", "decoder",
                                                                             "model", "data", "guard")}
    for legacy, path in LEGACY_KEYS.items():
        section, leaf = path.split(".")
        flat[legacy] = cfg[section][leaf] if section not in flat else flat[section].pop(leaf)
    flat["schedule"] = cfg["schedule"]["name"]
    ckpt["training"]["config"] = flat
    save_checkpoint(old / "ckpt.pt", ckpt)
    (old / "metrics.jsonl").write_text((tmp_path / "a" / "metrics.jsonl").read_text())
    for out in (tmp_path / "a", old):
        assert main(["--out", str(out), "--resume", "--no-progress"]) == 0
    ends = [json.loads((out / "metrics.jsonl").read_text().splitlines()[-1]) for out in (tmp_path / "a", old)]
    assert ends[0]["step"] == 4 and ends[0]["param_digests"] == ends[1]["param_digests"]
    assert [r["loss"] for r in read_metrics(tmp_path / "a")] == [r["loss"] for r in read_metrics(old)]
    assert load_checkpoint(old / "ckpt.pt")["training"]["config_version"] == 2

    ckpt["training"]["config"] = {**flat, "warmup": 3}  # a key no d2v ever had: refused in one line
    save_checkpoint(old / "ckpt.pt", ckpt)
    assert main(["--out", str(old), "--resume", "--no-progress"]) == 2


def test_metrics_report_model_flops_and_mfu(tmp_path, data):
    out = tmp_path / "m"
    assert main(args_for("text", data, out, 2, "--set", "peak_tflops=0.001")) == 0
    rows = read_metrics(out)
    assert all(r["model_flops_per_s"] > 0 and 0 < r["mfu"] for r in rows)
    assert "mfu" not in load_checkpoint(out / "ckpt.pt")["training"]["metrics"]  # wall-clock figures stay out
    assert torch.load(out / "ckpt.pt", weights_only=True)["training"]["config"]["peak_tflops"] == 0.001
