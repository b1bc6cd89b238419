"""d2v-train end to end on data the tests make: harmonic tones / chirps (+ espeak-ng speech when installed),
pillow-drawn shapes, and sentences; tiny models cut further with --set so the whole file runs in a couple of minutes."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image, ImageDraw

from d2v.training.checkpoint import load_checkpoint, load_encoder
from d2v.training.cli import main
from d2v.training.config import from_dict, resolve_config, set_assignment
from d2v.training.trainer import CollapseError, Trainer
from tests.factories import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CUT = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.ffn_size=64", "model.target_layers=2"]
SMALL_CONV = "model.conv_layers=" + json.dumps([[32, 10, 5]] + [[32, 3, 2]] * 4 + [[32, 2, 2]] * 2)
# Tiny runs of a few hundred updates: audio and image train with the short recipe (the values these tests were
# calibrated with), text with the reference but warmed up over 1 % of the run (the reference's 10k updates would
# leave it in warmup throughout).
SETS = {
    "audio": CUT + [SMALL_CONV, "data.max_samples=16000", "recipe=short"],
    "image": CUT + ["recipe=short"],
    "text": CUT + ["data.vocab_size=400", "schedule.warmup_steps=null"],
}
SUBJECTS = ["the cat", "a dog", "my teacher", "the student", "a small bird", "the old man", "our model", "the river",
            "a child", "the engineer", "every farmer", "the quiet girl"]
VERBS = ["sees", "likes", "follows", "builds", "finds", "paints", "reads", "carries", "watches", "teaches", "hears"]
OBJECTS = ["a red ball", "the green tree", "many small stones", "the quiet house", "a long letter",
           "the bright moon", "two yellow boats", "the heavy box", "a blue kite", "the wooden door"]
ENDINGS = ["today", "every morning", "in the garden", "near the sea", "after dinner", "with great care", "slowly",
           "at night", "before the rain", "on the hill"]


def write_corpus(path: Path, lines: int = 400, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    pick = lambda words: words[int(rng.integers(len(words)))]  # noqa: E731
    text = "".join(f"{pick(SUBJECTS)} {pick(VERBS)} {pick(OBJECTS)} {pick(ENDINGS)}.\n" for _ in range(lines))
    path.write_text(text, encoding="utf-8")
    return path


def write_audio(directory: Path, count: int = 16, seed: int = 0) -> Path:
    """Harmonic tones and chirps with a decay, 16 kHz; a few espeak-ng utterances (22.05 kHz) when available."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sr = 16000
    for i in range(count):
        n = int(sr * rng.uniform(1.0, 1.5))
        t = np.arange(n) / sr
        f0 = rng.uniform(100, 300)
        freq = f0 * (1 + t * rng.uniform(0.5, 2.0)) if i % 2 else np.full(n, f0)
        phase = 2 * np.pi * np.cumsum(freq) / sr
        x = sum(np.sin(k * phase) / k for k in range(1, 6)) * np.exp(-t * rng.uniform(0, 2))
        x = x + 0.01 * rng.standard_normal(n)
        sf.write(directory / f"tone{i:03d}.wav", (0.3 * x / np.abs(x).max()).astype(np.float32), sr)
    if shutil.which("espeak-ng"):
        for i, sentence in enumerate(["the teacher sees the whole sentence", "speech images and text",
                                      "a student learns from a masked view", "one learning method"]):
            subprocess.run(["espeak-ng", "-w", str(directory / f"speech{i}.wav"), sentence], check=True,
                           capture_output=True)
    return directory


def write_images(directory: Path, count: int = 16, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    color = lambda: tuple(int(c) for c in rng.integers(0, 256, 3))  # noqa: E731
    for i in range(count):
        img = Image.new("RGB", (80, 72), color())
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x0, y0 = (int(v) for v in rng.integers(0, 56, 2))
            box = [x0, y0, x0 + int(rng.integers(10, 30)), y0 + int(rng.integers(10, 30))]
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color())
        img.save(directory / f"shape{i:03d}.png")
    return directory


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train_data")
    return {"audio": write_audio(root / "wav"), "image": write_images(root / "img"),
            "text": write_corpus(root / "corpus.txt")}


def args_for(modality: str, data: dict[str, Path], out: Path, steps: int, *extra: str) -> list[str]:
    argv = ["--modality", modality, "--data", str(data[modality]), "--preset", "tiny", "--steps", str(steps),
            "--out", str(out), "--batch-size", "4", "--log-every", "1", "--no-progress"]
    for s in SETS[modality]:
        argv += ["--set", s]
    return argv + list(extra)


def read_metrics(out: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "event" not in r]


@pytest.mark.parametrize("modality", ["audio", "image", "text"])
def test_loss_falls_and_targets_keep_their_spread(tmp_path, data, modality):
    out = tmp_path / "run"
    extra = ["--lr", "1e-3"] if modality != "audio" else []
    assert main(args_for(modality, data, out, 100, "--save-every", "50", *extra)) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 101))
    first = np.mean([r["loss"] for r in rows[:10]])
    last = np.mean([r["loss"] for r in rows[-10:]])
    assert last < 0.75 * first, (first, last)
    assert min(r["target_var"] for r in rows) > 0.1  # the collapse guard's default threshold
    assert all(np.isfinite(r["loss"]) for r in rows)

    path = out / "ckpt.pt"
    raw = torch.load(path, weights_only=True)  # the whole checkpoint, training state included, is weights-only
    ckpt = load_checkpoint(path)
    training = ckpt["training"]
    assert training["step"] == 100 and training["config"]["modality"] == modality
    assert {"optimizer", "scheduler", "teacher", "head", "ema", "rng", "data", "config"} <= set(training)
    assert raw["training"]["data"]["micro_step"] == 100
    encoder = load_encoder(ckpt)
    assert ckpt["config"]["hidden_size"] == 32
    if modality == "text":
        tokenizer = ckpt["preprocessing"]["tokenizer"]
        assert isinstance(tokenizer, str) and ckpt["config"]["vocab_size"] <= 400
        assert encoder.token_embed.num_embeddings == ckpt["config"]["vocab_size"]
    end = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert end["event"] == "end" and end["ranks_in_sync"]


def assert_resume_reproduces(build_args, data, tmp_path: Path, steps: int, stop: int, extra: tuple[str, ...],
                             training_keys: tuple[str, ...], modality: str = "audio") -> tuple[list[dict], list[dict]]:
    """`steps` updates in one go vs `stop` updates, stop, --resume for the rest: identical losses, encoder weights and
    the listed `training` state dicts, bitwise (CPU). Returns both runs' metrics."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(build_args(modality, data, whole, steps, *extra)) == 0
    assert main(build_args(modality, data, parts, steps, *extra, "--set", f"stop_at={stop}")) == 0
    assert load_checkpoint(parts / "ckpt.pt")["training"]["step"] == stop
    assert main(["--out", str(parts), "--resume", "--no-progress"]) == 0
    a, b = read_metrics(whole), read_metrics(parts)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    ca, cb = load_checkpoint(whole / "ckpt.pt"), load_checkpoint(parts / "ckpt.pt")
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    for key in training_keys:
        assert all(torch.equal(ca["training"][key][k], cb["training"][key][k]) for k in ca["training"][key])
    return a, b


def test_resume_reproduces_the_uninterrupted_run(tmp_path, data):
    """Audio with dropout, decoding threads and gradient accumulation, so RNG, data position and accumulation count."""
    extra = ("--accum", "2", "--save-every", "3", "--set", "model.dropout=0.1", "--set", "data.num_workers=2")
    a, b = assert_resume_reproduces(args_for, data, tmp_path, 8, 5, extra, ("teacher", "head"))
    assert [r["target_var"] for r in a] == [r["target_var"] for r in b]


def test_resume_reproduces_a_short_recipe_run(tmp_path, data):
    """The recipe's own embedding group (15x lr) and slow teacher survive a stop and --resume."""
    assert_resume_reproduces(args_for, data, tmp_path, 6, 3, ("--recipe", "short"), ("teacher", "head"), "text")
    assert load_checkpoint(tmp_path / "parts" / "ckpt.pt")["training"]["config"]["recipe"] == "short"


def test_the_same_run_gives_a_byte_identical_checkpoint(tmp_path, data, monkeypatch):
    """Same seed, data and arguments (relative --out, as scripts/build_demo_models.py runs it): same bytes."""
    digests = []
    for where in ("first", "second"):
        (tmp_path / where).mkdir()
        monkeypatch.chdir(tmp_path / where)
        assert main(args_for("text", data, Path("run"), 6, "--seed", "3")) == 0
        digests.append(hashlib.sha256(Path("run/ckpt.pt").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_a_kill_at_any_moment_leaves_a_loadable_checkpoint(tmp_path, data):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "d2v.training.cli", *args_for("image", data, out, 5000, "--save-every", "1")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            metrics = out / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # most likely in the middle of writing a checkpoint
    finally:
        proc.kill()
        proc.wait()
    step = load_checkpoint(out / "ckpt.pt")["training"]["step"]
    assert step >= 3
    leftovers = [p.name for p in out.iterdir() if p.name not in ("ckpt.pt", "metrics.jsonl")]
    assert all(name.startswith(".ckpt.pt.") for name in leftovers)  # at most a torn temp file, never a torn ckpt
    assert main(["--out", str(out), "--resume", "--steps", str(step + 2), "--no-progress"]) == 0
    assert [r["step"] for r in read_metrics(out)] == list(range(1, step + 3))


def test_collapse_guard_stops_with_one_line(tmp_path, data, capsys):
    code = main(args_for("image", data, tmp_path / "run", 20, "--set", "guard.after=2",
                         "--set", "guard.min_target_var=100"))
    assert code == 3
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    value = read_metrics(tmp_path / "run")[-1]["target_var"]
    assert err == [f"d2v-train: error: collapse guard: target_var {value:.4g} fell below min_target_var=100.0 at step 3"
                   " (guard active after 2 updates)"]


def test_collapse_guard_fires_on_a_collapsed_teacher(tmp_path, data):
    sets = SETS["text"] + [f"data.path={data['text']}", "steps=5", f"out={tmp_path}", "guard.after=0",
                           "progress=false", "batch_size=4", "data.num_workers=0"]
    trainer = Trainer(resolve_config("text", layers=[set_assignment(s) for s in sets]))
    with torch.no_grad():
        for p in trainer.objective.teacher.model.parameters():
            p.zero_()  # every target the same: nothing left to learn but a constant
    metrics = trainer.train_step()
    assert metrics["target_var"] < 0.01
    with pytest.raises(CollapseError, match=r"target_var .* fell below min_target_var=0.1 at step 1"):
        trainer.check_collapse(metrics)


def test_init_continues_from_an_imported_checkpoint(tmp_path, data):
    init = write_tiny_checkpoint("text", tmp_path)
    out = tmp_path / "run"
    argv = ["--modality", "text", "--data", str(data["text"]), "--steps", "3", "--out", str(out), "--init", str(init),
            "--batch-size", "4", "--no-progress", "--lr", "1e-9"]
    assert main(argv) == 0
    source, trained = load_checkpoint(init), load_checkpoint(out / "ckpt.pt")
    assert trained["preprocessing"] == source["preprocessing"]  # its tokenizer, not a new one
    assert trained["config"] | {"dropout": 0, "attention_dropout": 0} == source["config"] | {"dropout": 0,
                                                                                          "attention_dropout": 0}
    diffs = [(trained["model"][k] - source["model"][k]).abs().max().item() for k in source["model"]]
    assert max(diffs) < 1e-5  # started from those weights (lr ~0 moved them by nothing)


def test_config_layers_and_errors(tmp_path, data, capsys):
    conf = tmp_path / "c.yaml"
    conf.write_text("lr: 0.01\nbatch_size: 3\nmasking:\n  mask_prob: 0.5\n")
    base = ["--modality", "audio", "--data", str(data["audio"]), "--steps", "10", "--out", str(tmp_path / "o")]
    assert main(base + ["--config", str(conf), "--batch-size", "5", "--set", "masking.mask_length=4",
                        "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["optimizer"]["lr"] == 0.01 and cfg["batch_size"] == 5  # file < flags (the file's old flat `lr`)
    assert cfg["masking"] == {"mask_prob": 0.5, "mask_length": 4, "min_masks": 2, "require_same_masks": True}
    assert cfg["teacher"]["drop"] == ["feature_extractor", "feature_projection", "mask_embedding"]
    assert main(base + ["--set", "masking.mask_prb=0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean 'mask_prob'" in err[0]
    assert main(base + ["--set", "lr=fast"]) == 2
    assert main(["--data", "x", "--steps", "1", "--out", str(tmp_path / "none")]) == 2  # no modality, no resume
    capsys.readouterr()
    for bad in (["--set", "optimizer.betas=[0.9]"], ["--set", "decoder.kernel=7"], ["--set", "model.hiden_size=8"],
                ["--set", "schedule.name=linear"], ["--set", "ema.decay=slow"]):
        assert main(base + bad) == 2, bad
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("d2v-train: error: "), (bad, err)


def test_print_config_needs_neither_data_nor_out(capsys):
    assert main(["--modality", "image", "--objective", "data2vec2", "--print-config"]) == 0
    captured = capsys.readouterr()
    cfg = json.loads(captured.out)
    assert cfg["recipe"] is None and cfg["optimizer"]["lr"] == 1e-3 and cfg["masking"]["num_masks"] == 16
    assert main(["--modality", "image", "--recipe", "short", "--preset", "base", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["preset"] == "base"


def test_short_recipe_warns_at_base_and_past_50k_updates(tmp_path, data, capsys):
    base = ["--modality", "text", "--data", str(data["text"]), "--recipe", "short", "--steps", "0", "--no-progress",
            *(a for s in SETS["text"] for a in ("--set", s))]
    assert main(base + ["--out", str(tmp_path / "w")]) == 0
    err = capsys.readouterr().err
    assert "d2v-train: recipe: 'short' for data2vec text" in err and "warning" not in err
    assert main(base + ["--out", str(tmp_path / "w2"), "--preset", "base", "--set", "steps=60000", "--set",
                        "stop_at=1"]) == 0  # the cut model: one cheap update
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 2 and "preset base" in warnings[0] and "past 50000" in warnings[1]


def test_short_recipe_is_a_layer_of_the_config(tmp_path, data, capsys):
    base = ["--modality", "text", "--data", str(data["text"]), "--steps", "10", "--out", str(tmp_path / "o")]
    assert main(base + ["--recipe", "short", "--set", "embed_lr_scale=10", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["recipe"] == "short" and cfg["loss"]["head_input"] == "document"
    assert cfg["optimizer"]["embed_lr_scale"] == 10.0  # the old flat key still reaches its section
    assert cfg["ema"]["decay"] == cfg["ema"]["end_decay"] == 0.99999 and cfg["teacher"]["copy"] == []
    assert cfg["masking"] == {"mask_prob": 0.5, "leave_unmasked_prob": 0.1, "random_token_prob": 0.1, "mask_span": 1}
    reference = resolve_config("text").to_dict()
    assert cfg["optimizer"]["lr"] == reference["optimizer"]["lr"]  # what the recipe does not name stays the reference
    assert main(base + ["--set", "recipe=short", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"]["head_input"] == "document"
    assert main(base + ["--recipe", "short", "--objective", "data2vec2", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)  # data2vec2's own text defaults, the recipe on top
    assert cfg["objective"] == "data2vec2" and cfg["loss"]["head_input"] == "document" and cfg["teacher"]["copy"] == []
    assert cfg["model"]["target_norm"] == "layer"  # data2vec2's instance norm would centre the document away
    # and data2vec2's own recipe values: no decoder convs under the document head, 4 masks of 32 documents
    assert cfg["masking"] == {"mask_prob": 0.5, "mask_length": 1, "num_masks": 4}
    assert cfg["batch_size"] == 32 and cfg["decoder"]["layers"] == 0
    d2v2 = ["--objective", "data2vec2", "--recipe", "short"]
    for bad, says in ((["--set", "recipe=long"], "unknown recipe 'long'"),
                      (["--set", "loss.head_input=cls"], "head_input must be 'position' or 'document'"),
                      (["--set", "embed_lr_scale=0"], "embed_lr_scale must be a positive number"),
                      (d2v2 + ["--set", "head_input=position"], "decoder.layers 0 needs loss.head_input=document"),
                      (d2v2 + ["--set", "decoder.layers=-1"], "decoder.layers must be a non-negative integer")):
        assert main(base + bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], (bad, err)
    image = ["--modality", "image", "--data", str(data["image"]), "--steps", "10", "--out", str(tmp_path / "i")]
    assert main(image + ["--set", "embed_lr_scale=2"]) == 2
    assert "text models only" in capsys.readouterr().err


@pytest.mark.parametrize("objective", ["data2vec", "data2vec2"])
def test_short_recipe_trains_with_a_slow_teacher_and_faster_embeddings(tmp_path, data, objective):
    out = tmp_path / "short"
    assert main(args_for("text", data, out, 6, "--recipe", "short", "--objective", objective)) == 0
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["training"]["config"]["recipe"] == "short"
    assert ckpt["training"]["config"]["objective"] == objective
    initial = Trainer(from_dict({**ckpt["training"]["config"], "steps": 6, "out": str(tmp_path / "again")}))
    teacher, start = ckpt["training"]["teacher"], initial.objective.teacher.model.state_dict()
    assert all(torch.allclose(teacher[k], v, atol=1e-6) for k, v in start.items())  # its own embeddings, EMA 0.99999
    moved = ckpt["model"]["token_embed.weight"] - initial.objective.student.token_embed.weight
    assert moved.abs().max() > 1e-3
    initial.train_step()
    lrs = {g.get("lr_scale", 1.0): g["lr"] for g in initial.optimizer.param_groups}
    assert lrs[15.0] == pytest.approx(15.0 * lrs[1.0]) and lrs[1.0] > 0
    rows = read_metrics(out)
    assert len(rows) == 6 and all(np.isfinite(r["loss"]) for r in rows)


def test_data_problems_are_one_line_errors(tmp_path, capsys):
    code = main(["--modality", "image", "--data", str(tmp_path / "missing"), "--steps", "2", "--out",
                 str(tmp_path / "o"), "--no-progress"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file or directory" in err[0]



def test_a_finished_run_is_not_overwritten_without_resume(tmp_path, data, capsys):
    out = tmp_path / "run"
    assert main(args_for("text", data, out, 2)) == 0
    before = (out / "ckpt.pt").read_bytes()
    assert main(args_for("text", data, out, 2)) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert (out / "ckpt.pt").read_bytes() == before
