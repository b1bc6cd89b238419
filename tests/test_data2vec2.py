"""data2vec 2.0 (`d2v-train --objective data2vec2`): gather/scatter, masks, decoder, M-fold target reuse, training,
resume, DDP, and that export sees the encoder alone. Small random models; no timing."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from d2v.training.checkpoint import load_checkpoint, load_encoder
from d2v.training.cli import main
from d2v.training.config import resolve_config, resolve_derived
from d2v.training.masking import MultiMasker, exact_block_mask, inverse_block_mask, visible_positions
from d2v.training.models import EncoderConfig, build_encoder
from d2v.training.models.gather import gather_positions, scatter_positions
from d2v.training.models.init import init_weights
from d2v.training.objectives.data2vec2 import Data2Vec2
from d2v.training.targets import target_representation
from tests.test_train import (
    SETS,
    args_for,
    assert_resume_reproduces,
    read_metrics,
    write_audio,
    write_corpus,
    write_images,
)

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(hidden_size=32, num_layers=3, num_heads=4, ffn_size=64)
EXTRA = {"audio": dict(conv_layers=[[16, 10, 5]] + [[16, 3, 2]] * 4 + [[16, 2, 2]] * 2, pos_conv_layers=2),
         "image": dict(image_size=32, patch_size=8), "text": dict(vocab_size=60, max_positions=40)}


# audio and image: the short recipe (tuned for tiny runs); text: the reference (its short recipe has no decoder convs)
TESTED_RECIPE = {"audio": "short", "image": "short", "text": None}


def make_objective(modality: str, num_masks: int = 3, noise: float = 0.01, seed: int = 0,
                   cls_loss: float | None = None, head_input: str = "position",
                   decoder_layers: int | None = None) -> Data2Vec2:
    """The trainer's construction on a small random encoder, with the values these tests were written against."""
    cfg = resolve_config(modality, "data2vec2", TESTED_RECIPE[modality])
    if cls_loss is not None:
        cfg.loss.cls_loss = cls_loss
    if decoder_layers is not None:
        cfg.decoder.layers = decoder_layers
    cfg.steps, cfg.decoder.mask_noise_std, cfg.masking.num_masks, cfg.loss.head_input = 10, noise, num_masks, head_input
    resolve_derived(cfg, SMALL["hidden_size"], 16)
    torch.manual_seed(seed)
    model = {k: v for k, v in cfg.model.items() if k != "layerdrop"}
    enc = EncoderConfig.preset(modality, "tiny", cfg.teacher.target_layers_of_12, **SMALL, **EXTRA[modality], **model)
    return Data2Vec2.from_config(init_weights(build_encoder(enc)), cfg)


def short_masking(modality: str) -> dict:
    return dataclasses.asdict(resolve_config(modality, "data2vec2", TESTED_RECIPE[modality]).masking)


def make_batch(modality: str, masker_options: dict, num_masks: int, seed: int = 0) -> dict:
    """A numpy batch of 2 items (the second padded for audio and text) through the data2vec2 masker."""
    rng = np.random.default_rng(seed)
    enc = EncoderConfig.preset(modality, "tiny", **SMALL, **EXTRA[modality])
    if modality == "audio":
        x = rng.standard_normal((2, 8000)).astype(np.float32)
        attention = np.ones((2, 8000), dtype=np.int64)
        attention[1, 5000:] = 0
        x[1, 5000:] = 0
        batch = {"input_values": x, "attention_mask": attention}
    elif modality == "image":
        batch = {"pixel_values": rng.standard_normal((2, 3, 32, 32)).astype(np.float32)}
    else:
        ids = rng.integers(5, 59, (2, 12))
        ids[:, 0], ids[0, 11], ids[1, 8], ids[1, 9:] = 0, 2, 2, 1
        batch = {"input_ids": ids, "attention_mask": (ids != 1).astype(np.int64)}
    options = {**masker_options, "num_masks": num_masks}
    if modality == "image":
        options["keep_patches"] = 5
    out = MultiMasker(modality, options, conv_layers=enc.conv_layers, grid=enc.grid_size)(batch, rng)
    return {k: {n: torch.from_numpy(v) for n, v in out[k].items()} if k == "inputs" else torch.from_numpy(out[k])
            for k in out}


def per_item(obj: Data2Vec2, inputs: dict, modality: str) -> Iterator[tuple]:
    """(index, student features, valid mask, teacher targets at the masked-able positions) for each item, alone."""
    prefix = 1 if modality == "image" else 0
    for b in range(len(next(iter(inputs.values())))):
        item = {k: v[b: b + 1] for k, v in inputs.items()}
        x, valid = obj.student.embed(**item)
        y = target_representation(obj.teacher.model.encode(x, valid) if modality == "audio"
                                  else obj.teacher.model(**item), obj.cfg)[0, prefix:]
        yield b, x, valid, y


def runs(row: np.ndarray) -> list[int]:
    """Lengths of the maximal runs of True."""
    padded = np.concatenate([[False], row, [False]]).astype(int)
    edges = np.flatnonzero(np.diff(padded))
    return list(edges[1::2] - edges[::2])


# ------------------------------------------------------------------------------------------------ gather / scatter


def test_gather_and_scatter_match_a_naive_loop():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 4, generator=gen)
    index = torch.stack([torch.randperm(10, generator=gen)[:6].sort().values for _ in range(3)])
    gathered = gather_positions(x, index)
    fill = torch.randn(3, 10, 4, generator=gen)
    scattered = scatter_positions(gathered * 2, index, 10, fill)
    for b in range(3):
        for k in range(6):
            assert torch.equal(gathered[b, k], x[b, index[b, k]])
        for t in range(10):
            expected = x[b, t] * 2 if t in index[b].tolist() else fill[b, t]
            assert torch.equal(scattered[b, t], expected)
    assert torch.equal(gather_positions(x[..., 0] > 0, index)[1], (x[1, :, 0] > 0)[index[1]])  # 2-D masks too


def test_visible_positions_keep_every_unmasked_valid_position_and_equal_lengths():
    valid = np.zeros((3, 10), dtype=bool)
    valid[0], valid[1, :7], valid[2, :4] = True, True, True
    mask = np.zeros_like(valid)
    mask[0, [1, 2, 3, 7, 8]], mask[1, [0, 5, 6]], mask[2, [3]] = True, True, True
    keep = visible_positions(mask, valid)
    assert keep.shape == (3, 5)  # 10 - the most masked in a row
    for row in range(3):
        shown = set(np.flatnonzero(~mask[row] & valid[row]))
        assert shown <= set(keep[row]) and not set(np.flatnonzero(mask[row])) & set(keep[row])
        assert list(keep[row]) == sorted(keep[row])
        assert set(keep[row]) - shown <= set(np.flatnonzero(~valid[row]))  # the rest is padding


# ------------------------------------------------------------------------------------------------ masks


def test_audio_blocks_are_exact_and_of_the_block_length():
    rng = np.random.default_rng(0)
    for size in (7, 24, 49, 250):
        for _ in range(50):
            count = round(0.5 * size)
            row = exact_block_mask(size, count, 5, rng)
            assert row.sum() == count
            lengths = runs(row)
            assert sum(1 for n in lengths if n < 5) <= 1  # only the remainder block may be shorter
            assert all(n >= count % 5 for n in lengths)


def test_multi_masker_rates_per_item_with_padding():
    enc = EncoderConfig.preset("audio", "tiny")
    masker = MultiMasker("audio", {"mask_prob": 0.5, "mask_length": 5, "num_masks": 4}, conv_layers=enc.conv_layers)
    samples = np.array([16000, 11000, 9000])
    attention = (np.arange(16000)[None, :] < samples[:, None]).astype(np.int64)
    out = masker({"input_values": np.zeros((3, 16000), np.float32), "attention_mask": attention},
                 np.random.default_rng(1))
    frames = (samples - 400) // 320 + 1
    assert out["mask"].shape == (12, frames.max())
    for row, m in enumerate(out["mask"]):
        n = frames[row // 4]
        assert m.sum() == round(0.5 * n) and not m[n:].any()  # exactly half of the item's valid frames
    assert out["keep"].shape == (12, frames.max() - round(0.5 * frames.max()))

    text = MultiMasker("text", {"mask_prob": 0.48, "mask_length": 1, "num_masks": 8})
    ids = np.full((2, 30), 1)
    ids[0, :30], ids[1, :13] = 7, 7
    out = text({"input_ids": ids, "attention_mask": (ids != 1).astype(np.int64)}, np.random.default_rng(2))
    assert [int(m.sum()) for m in out["mask"]] == [round(0.48 * 30)] * 8 + [round(0.48 * 13)] * 8
    assert not out["mask"][8:, 13:].any()
    assert len({tuple(np.flatnonzero(m)) for m in out["mask"][:8]}) == 8  # M different masks per item


def test_image_inverse_blocks_keep_exact_clustered_patches():
    rng = np.random.default_rng(3)
    neighbours, random_neighbours = [], []
    for _ in range(200):
        kept = ~inverse_block_mask(14, 39, 3, rng).reshape(14, 14)
        assert kept.sum() == 39
        shifted = np.zeros((4, 14, 14), dtype=int)
        shifted[0, 1:], shifted[1, :-1], shifted[2, :, 1:], shifted[3, :, :-1] = (
            kept[:-1], kept[1:], kept[:, :-1], kept[:, 1:])
        neighbours.append(shifted.sum(0)[kept].mean())
        scattered = np.zeros(196, dtype=bool)
        scattered[rng.choice(196, 39, replace=False)] = True
        scattered = scattered.reshape(14, 14)
        random_neighbours.append((scattered[1:] & scattered[:-1]).sum() * 2 / 39
                                 + (scattered[:, 1:] & scattered[:, :-1]).sum() * 2 / 39)
    assert np.mean(neighbours) > 2.0 > 2 * np.mean(random_neighbours)  # blocks, not scattered patches
    masker = MultiMasker("image", {"keep_patches": 13, "keep_block": 3, "num_masks": 16}, grid=8)
    out = masker({"pixel_values": np.zeros((2, 3, 64, 64), np.float32)}, np.random.default_rng(4))
    assert out["mask"].shape == (32, 64) and (out["mask"].sum(1) == 64 - 13).all()
    assert out["keep"].shape == (32, 13)


def test_tiny_image_defaults_scale_the_kept_patches_and_decoder_width():
    cfg = resolve_derived(resolve_config("image", "data2vec2", layers=[{"steps": 10}]), 64, 64)
    assert cfg.masking.keep_patches == round(39 / 196 * 64) and cfg.decoder.dim == 64
    assert cfg.masking.num_masks == 16 and cfg.loss.cls_loss == 0.01  # the reference
    audio = resolve_derived(resolve_config("audio", "data2vec2", "short", [{"steps": 10}]), 384, None)
    assert audio.decoder.dim == 192 and audio.masking.num_masks == 8 and audio.batch_size == 2
    short = resolve_config("image", "data2vec2", "short")
    assert short.masking.num_masks == 4 and short.loss.cls_loss == 0.0  # tuned for short tiny runs


# ------------------------------------------------------------------------------------------------ the objective


@pytest.mark.parametrize("modality", ["audio", "image", "text"])
def test_decoder_shapes_per_modality(modality):
    obj = make_objective(modality)
    spec = obj.decoder_spec
    first = obj.head.convs[0]
    assert len(obj.head.convs) == {"audio": 2, "image": 6, "text": 5}[modality]  # audio: 2 tuned (reference 4)
    assert isinstance(first, torch.nn.Conv2d if modality == "image" else torch.nn.Conv1d)
    assert first.kernel_size[0] == {"audio": 5, "image": 3, "text": 9}[modality]  # audio: 5 tuned (short recipe)
    assert spec.dim == {"audio": 16, "image": 32, "text": 32}[modality]  # reference width x hidden / 768
    x = torch.randn(3, 16, 32)
    assert obj.head(x).shape == (3, 16, 32)
    assert obj.head.features(x).shape == (3, 16, spec.dim)
    if modality == "image":  # 2-D: a patch only sees its grid neighbours (kernel 3), not the next row's far end
        one = torch.zeros(1, 16, 32)
        one[0, 0] = 1.0
        conv_only = obj.head.convs[0](one.transpose(1, 2).unflatten(2, (4, 4))).flatten(2)
        bias = obj.head.convs[0].bias[:, None]
        touched = (conv_only - bias).abs().sum(1)[0] > 0
        assert touched.nonzero().flatten().tolist() == [0, 1, 4, 5]


@pytest.mark.parametrize("modality", ["audio", "image", "text"])
def test_teacher_runs_once_per_item_and_its_targets_serve_every_mask(modality):
    m = 3
    # image: the reference's CLS weight (the defaults leave the term out), so that the loop checks it too
    obj = make_objective(modality, num_masks=m, noise=0.0, cls_loss=0.01 if modality == "image" else None).eval()
    batch = make_batch(modality, short_masking(modality), m)
    calls = {"teacher": [], "student": []}
    obj.teacher.model.transformer.register_forward_hook(lambda mod, a, o: calls["teacher"].append(a[0].shape[0]))
    obj.student.transformer.register_forward_hook(lambda mod, a, o: calls["student"].append(a[0].shape[0]))
    out = obj(**batch)
    assert calls == {"teacher": [2], "student": [2 * m]}  # one teacher pass for 2 items, their 2 x M masked copies

    with torch.no_grad():  # the same loss from a loop: item by item, mask by mask
        mask, keep, inputs = batch["mask"], batch["keep"], batch["inputs"]
        prefix = 1 if modality == "image" else 0
        total, count, cls_total = 0.0, 0, 0.0
        for b, x, valid, y in per_item(obj, inputs, modality):
            for j in range(m):
                r = b * m + j
                h = obj.student.encode(x, valid, keep=keep[r: r + 1]).last_hidden_state[0]
                full = torch.zeros(mask.shape[1], x.shape[-1])
                for k, t in enumerate(keep[r].tolist()):
                    full[t] = h[prefix + k]
                pred = obj.head(full[None], None if valid is None else valid)[0]
                for t in np.flatnonzero(mask[r].numpy()):
                    total += float(((pred[t] - y[t]) ** 2).sum()) * obj.loss_spec.scale
                    count += 1
                if prefix:
                    cls_total += float(((h[0] - y.mean(0)) ** 2).sum()) * obj.loss_spec.scale
    assert out.stats["masked"].item() == count == int(mask.sum())
    assert out.loss.item() == pytest.approx(total / count + obj.cls_loss * cls_total, rel=1e-4)


@pytest.mark.parametrize("decoder_layers", [None, 0])
@pytest.mark.parametrize("modality", ["audio", "image", "text"])
def test_document_head_input_predicts_every_masked_position_from_the_rows_mean(modality, decoder_layers):
    """head_input="document" (`--recipe short`): each row's masked positions are all predicted by the decoder from
    one position, the mean of the row's visible, non-padded outputs; written here as a loop. With 0 decoder layers
    (the short text recipe for data2vec2) the decoder is its projection alone."""
    m = 3
    obj = make_objective(modality, num_masks=m, noise=0.0, head_input="document",
                         decoder_layers=decoder_layers).eval()
    if decoder_layers == 0:
        assert len(obj.head.convs) == 0
    batch = make_batch(modality, short_masking(modality), m)
    out = obj(**batch)
    with torch.no_grad():
        mask, keep, inputs = batch["mask"], batch["keep"], batch["inputs"]
        prefix = 1 if modality == "image" else 0
        total, count = 0.0, 0
        for b, x, valid, y in per_item(obj, inputs, modality):
            for j in range(m):
                r = b * m + j
                h = obj.student.encode(x, valid, keep=keep[r: r + 1]).last_hidden_state[0, prefix:]
                seen = [h[k] for k, t in enumerate(keep[r].tolist()) if valid is None or valid[0, t]]
                pred = obj.head((sum(seen) / len(seen))[None, None])[0, 0]
                for t in np.flatnonzero(mask[r].numpy()):
                    total += float(((pred - y[t]) ** 2).sum()) * obj.loss_spec.scale
                    count += 1
    assert out.loss.item() == pytest.approx(total / count, rel=1e-4)
    out.loss.backward()
    assert obj.student.transformer.layers[0].attn.v.weight.grad.abs().sum() > 0


def test_gradients_reach_student_and_decoder_and_the_mask_embedding_is_frozen():
    obj = make_objective("audio").train()
    batch = make_batch("audio", short_masking("audio"), 3)
    obj(**batch).loss.backward()
    assert all(p.grad is None for p in obj.teacher.parameters())
    assert not obj.student.mask_embedding.requires_grad  # never shown to the student: no gradient, DDP-safe
    assert obj.student.feature_extractor[0].conv.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.head.parameters())


@pytest.mark.parametrize("modality", ["audio", "image", "text"])
def test_bf16_autocast_trains_and_the_teacher_stays_fp32(modality):
    obj = make_objective(modality, num_masks=2).train()
    batch = make_batch(modality, short_masking(modality), 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = obj(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in obj.teacher.parameters())
    assert all(torch.isfinite(p.grad).all() for p in obj.head.parameters())


# ------------------------------------------------------------------------------------------------ d2v-train


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("d2v2_data")
    return {"audio": write_audio(root / "wav"), "image": write_images(root / "img"),
            "text": write_corpus(root / "corpus.txt")}


def v2_args(modality: str, data: dict[str, Path], out: Path, steps: int, *extra: str) -> list[str]:
    return args_for(modality, data, out, steps, "--objective", "data2vec2", "--set", "masking.num_masks=4",
                    "--set", "model.target_layers=2", *extra)


@pytest.mark.parametrize("modality", ["audio", "image", "text"])
def test_loss_falls_for_each_modality(tmp_path, data, modality):
    out = tmp_path / "run"
    steps = {"audio": 40, "image": 40, "text": 60}[modality]
    extra = {"audio": ["--set", "data.pad_audio=true", "--set", "masking.num_masks=2"],
             "image": ["--set", "masking.num_masks=2"], "text": ["--set", "ema_decay=0.999"]}[modality]
    assert main(v2_args(modality, data, out, steps, "--save-every", str(steps), "--lr", "2e-3", *extra)) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    first = np.mean([r["loss"] for r in rows[:10]])
    last = np.mean([r["loss"] for r in rows[-10:]])
    assert last < 0.75 * first, (first, last)
    assert all(np.isfinite(r["loss"]) for r in rows) and min(r["target_var"] for r in rows) > 0.1
    ckpt = load_checkpoint(out / "ckpt.pt")
    training = ckpt["training"]
    assert training["objective"] == "data2vec2" and training["config"]["objective"] == "data2vec2"
    assert {"teacher", "decoder"} <= set(training) and "head" not in training
    load_encoder(ckpt)  # the model entry is the encoder alone, loaded strictly


def test_resume_reproduces_the_uninterrupted_run(tmp_path, data):
    """Audio with dropout, layerdrop (the data2vec2 default), padding and accumulation: identical losses, weights,
    teacher and decoder, bitwise (CPU)."""
    extra = ("--accum", "2", "--save-every", "3", "--set", "model.dropout=0.1", "--set", "data.pad_audio=true")
    assert_resume_reproduces(v2_args, data, tmp_path, 6, 4, extra, ("teacher", "decoder"))


def test_objective_in_config_and_errors(tmp_path, data, capsys):
    base = ["--modality", "text", "--data", str(data["text"]), "--steps", "1", "--out", str(tmp_path / "c"),
            "--print-config"]
    assert main(base) == 0
    assert json.loads(capsys.readouterr().out)["objective"] == "data2vec"
    assert main(base + ["--set", "objective=data2vec2", "--set", "masking.num_masks=2"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["objective"] == "data2vec2" and cfg["masking"] == {"mask_prob": 0.48, "mask_length": 1, "num_masks": 2}
    assert cfg["decoder"]["kernel"] == 9
    assert main(base + ["--set", "masking.num_masks=2"]) == 2  # a data2vec2 key on a data2vec run
    assert "unknown config key 'masking.num_masks'" in capsys.readouterr().err
    assert main(base + ["--set", "objective=data2vec3"]) == 2
    assert "unknown objective 'data2vec3'" in capsys.readouterr().err

    out = tmp_path / "r"
    assert main(v2_args("text", data, out, 2)) == 0
    assert main(["--out", str(out), "--resume", "--objective", "data2vec", "--steps", "3", "--no-progress"]) == 2
    assert "cannot change in a resumed run" in capsys.readouterr().err


def test_collapse_guard_fires(tmp_path, data, capsys):
    out = tmp_path / "run"
    assert main(v2_args("text", data, out, 3, "--set", "guard.after=1", "--set", "guard.min_pred_var=100")) == 3
    assert "collapse guard: pred_var" in capsys.readouterr().err


def test_export_and_eval_see_the_encoder_alone(tmp_path, data):
    from d2v.eval.cli import CheckpointEmbedder
    from d2v.export import export_model

    out = tmp_path / "run"
    assert main(v2_args("image", data, out, 3, "--save-every", "3")) == 0
    ckpt = load_checkpoint(out / "ckpt.pt")
    encoder = load_encoder(ckpt)
    assert set(ckpt["model"]) == set(build_encoder(encoder.cfg).state_dict())
    decoder = ckpt["training"]["decoder"]
    assert decoder and not any(k.startswith(("decoder", "head", "convs", "proj")) for k in ckpt["model"])

    model_path = tmp_path / "image.onnx"
    export_model(out / "ckpt.pt", model_path)
    graph = onnx.load(str(model_path))
    weights = [numpy_helper.to_array(t) for t in graph.graph.initializer]
    for name, w in decoder.items():
        if w.numel() > 1:
            assert not any(a.shape == tuple(w.shape) and np.allclose(a, w.numpy()) for a in weights), name

    pixels = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(["last_hidden_state"], {"pixel_values": pixels})[0]
    with torch.no_grad():
        torch_out = encoder(torch.from_numpy(pixels)).last_hidden_state.numpy()
    assert np.abs(onnx_out - torch_out).max() <= 1e-4

    images = sorted(data["image"].glob("*.png"))[:3]
    vectors = CheckpointEmbedder(ckpt).embed(images)
    assert all(v.shape[0] == 3 for v in vectors.values())


def test_torchrun_two_processes_stay_in_sync(tmp_path, data):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "d2v.training.cli", "--modality", "audio", "--data", str(data["audio"]), "--steps", "3",
           "--out", str(out), "--batch-size", "2", "--device", "cpu", "--save-every", "3", "--no-progress",
           "--objective", "data2vec2", "--set", "masking.num_masks=2", "--set", "model.target_layers=2"]
    for s in SETS["audio"]:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    end = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert end["event"] == "end" and len(end["param_digests"]) == 2 and end["ranks_in_sync"]
