"""d2v-eval (linear probes of checkpoints and model files), d2v-train --steps 0, the guard default, training curves,
and the audio target-space refusal in the server. Data are made here: sentences of two topics, two-colour images."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from d2v.eval.cli import CheckpointEmbedder, evaluate
from d2v.eval.cli import main as eval_main
from d2v.eval.probe import EvalError, linear_probe, read_labelled
from d2v.training.checkpoint import encoder_config, initial_encoder, load_checkpoint
from d2v.training.cli import main as train_main
from d2v.training.config import resolve_config, resolve_derived
from d2v_serve.core.postprocess import output_options
from d2v_serve.core.request import EmbedOptions
from d2v_serve.errors import ServeError
from tests.factories import make_model_file, write_tiny_checkpoint
from tests.test_train import SETS

TOPICS = {"weather": ["rain", "snow", "storm", "cloud", "wind", "sun"],
          "kitchen": ["bread", "soup", "oven", "cheese", "pan", "salt"]}


def sentences(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = list(TOPICS)[i % 2]
        words = [TOPICS[label][int(j)] for j in rng.integers(0, 6, 3)]
        out.append((f"the {words[0]} and the {words[1]} were near the {words[2]}", label))
    return out


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_text")
    items = sentences(24)
    manifest = root / "topics.jsonl"
    manifest.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in items))
    folder = root / "folder"
    for i, (t, y) in enumerate(items):
        (folder / y).mkdir(parents=True, exist_ok=True)
        (folder / y / f"{i:03d}.txt").write_text(t + "\n")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(t + "\n" for t, _ in sentences(200, seed=1)))
    return {"manifest": manifest, "folder": folder, "corpus": corpus}


def test_labelled_data_from_folder_manifest_and_csv(tmp_path, text_data):
    folder = read_labelled(text_data["folder"], "text")
    manifest = read_labelled(text_data["manifest"], "text")
    assert folder.classes == manifest.classes == ["kitchen", "weather"] and len(folder) == len(manifest) == 24
    csv = tmp_path / "images.csv"
    for i in range(4):
        Image.new("RGB", (8, 8), (255 * (i % 2), 0, 0)).save(tmp_path / f"{i}.png")
    csv.write_text("path,label\n" + "".join(f"{i}.png,{'red' if i % 2 else 'black'}\n" for i in range(4)))
    data = read_labelled(csv, "image")
    assert data.items[0] == tmp_path / "0.png" and data.labels == ["black", "red", "black", "red"]
    (tmp_path / "one.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n')
    with pytest.raises(EvalError, match="at least 2 classes"):
        read_labelled(tmp_path / "one.jsonl", "text")
    with pytest.raises(EvalError, match="needs 'label'"):
        (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n')
        read_labelled(tmp_path / "bad.jsonl", "text")


def test_the_probe_separates_separable_vectors_and_reports_confusions():
    rng = np.random.default_rng(0)
    labels = ["a"] * 30 + ["b"] * 30
    separable = np.concatenate([rng.normal(0, 1, (30, 5)), rng.normal(4, 1, (30, 5))])
    result = linear_probe(separable, labels)
    assert result.accuracy == 1.0 and result.folds == 5 and result.confusion == [[30, 0], [0, 30]]
    noise = linear_probe(rng.normal(0, 1, (60, 5)), labels)
    assert noise.accuracy < 0.8 and sum(map(sum, noise.confusion)) == 60 and noise.chance == 0.5


def test_model_file_and_checkpoint_embed_alike_and_probe_both_data_forms(tmp_path, text_data):
    ckpt = write_tiny_checkpoint("text", tmp_path)
    onnx = make_model_file("text", tmp_path)
    items = read_labelled(text_data["manifest"], "text").items
    from d2v.eval.cli import embedder

    by_file, by_ckpt = embedder(onnx).embed(items), embedder(ckpt).embed(items)
    for r in ("last", "target"):
        assert np.abs(by_file[r] - by_ckpt[r]).max() < 1e-4
    folder = evaluate(onnx, text_data["folder"])
    manifest = evaluate(onnx, text_data["manifest"])
    for report in (folder, manifest):
        probe = report["models"]["pretrained"]["last"]
        assert 0 <= probe["accuracy"] <= 1 and sum(map(sum, probe["confusion"])) == 24
    assert folder["models"] == manifest["models"]  # the same items, the same folds


def test_steps_0_writes_the_initial_weights_and_baseline_probes_them(tmp_path, text_data, capsys):
    out, trained = tmp_path / "init", tmp_path / "trained"
    argv = ["--modality", "text", "--data", str(text_data["corpus"]), "--preset", "tiny", "--no-progress",
            "--seed", "3", "--batch-size", "4", "--set", SETS["text"][-1]]
    assert train_main([*argv, "--out", str(out), "--steps", "0"]) == 0
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["training"]["step"] == 0
    fresh = initial_encoder(encoder_config(ckpt), 3).state_dict()
    assert all(torch.equal(fresh[k], v) for k, v in ckpt["model"].items())
    # the baseline of a trained checkpoint is exactly what --steps 0 wrote for the same run
    assert train_main([*argv, "--out", str(trained), "--steps", "2"]) == 0
    items = read_labelled(text_data["manifest"], "text").items
    initial = CheckpointEmbedder(load_checkpoint(trained / "ckpt.pt"), initial=True).embed(items)
    written = CheckpointEmbedder(ckpt).embed(items)
    assert np.array_equal(initial["last"], written["last"])

    capsys.readouterr()
    plot = tmp_path / "pca.png"
    assert eval_main([str(trained / "ckpt.pt"), str(text_data["manifest"]), "--baseline", "--json", "-",
                      "--plot", str(plot), "--no-progress"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert set(report["models"]) == {"pretrained", "initial"}
    assert set(report["models"]["initial"]) == {"last", "target"}
    assert "pretrained" in captured.err and "initial" in captured.err  # the side-by-side table
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = trained / "curves.png"  # d2v-train's training curves beside metrics.jsonl
    assert curves.stat().st_size > 1000 and curves.read_bytes()[:4] == b"\x89PNG"


def test_model_file_baseline_needs_its_initial_weights(tmp_path, text_data, capsys):
    onnx = make_model_file("text", tmp_path)
    assert eval_main([str(onnx), str(text_data["manifest"]), "--baseline", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--baseline INIT.pt" in err[0]
    init = write_tiny_checkpoint("text", tmp_path, seed=5)
    assert eval_main([str(onnx), str(text_data["manifest"]), "--baseline", str(init), "--no-progress"]) == 0
    assert "initial" in capsys.readouterr().out


def test_audio_probes_the_last_layer_only(tmp_path):
    from tests.test_train import write_audio

    folder = tmp_path / "audio"
    write_audio(folder / "a", count=4, seed=0)
    write_audio(folder / "b", count=4, seed=1)
    for f in (folder / "b").glob("speech*.wav"):
        f.unlink()
    for f in (folder / "a").glob("speech*.wav"):
        f.unlink()
    report = evaluate(write_tiny_checkpoint("audio", tmp_path), folder, folds=2)
    assert list(report["models"]["pretrained"]) == ["last"] and "zero" in report["protocol"]["target"]


def test_audio_target_pooling_is_refused_in_one_line():
    from d2v_serve.cli import DEMO_MODELS
    from d2v_serve.models.model_file import read_metadata

    outputs = {"last": "last_hidden_state", "target": "target_hidden_state"}
    model = SimpleNamespace(name="a", modality="audio", outputs=outputs,
                            meta=read_metadata(DEMO_MODELS / "demo-audio.onnx"))
    for pooling in ("mean", "cls"):
        with pytest.raises(ServeError) as err:
            output_options(model, EmbedOptions(representation="target", pooling=pooling))
        assert err.value.code.name == "INVALID_ARGUMENT" and "pooling=none" in err.value.message
        assert "\n" not in err.value.message
    frames = output_options(model, EmbedOptions(representation="target", pooling="none"))
    assert frames.output == "target_hidden_state" and frames.pooling == "none"
    image = SimpleNamespace(name="i", modality="image", outputs=outputs,
                            meta=read_metadata(DEMO_MODELS / "demo-image.onnx"))
    assert output_options(image, EmbedOptions(representation="target")).pooling == "mean"


@pytest.mark.parametrize("steps, after", [(0, 100), (500, 100), (2000, 200), (30000, 3000), (100000, 5000)])
def test_the_guard_starts_at_10_percent_of_short_runs(steps, after):
    assert resolve_derived(resolve_config("image", layers=[{"steps": steps}]), 64, 64).guard.after == after
    cfg = resolve_config("image", layers=[{"steps": steps, "guard": {"after": 7}}])  # an explicit value stays
    assert resolve_derived(cfg, 64, 64).guard.after == 7


def test_eval_errors_are_one_line(tmp_path, text_data, capsys):
    assert eval_main([str(tmp_path / "missing.pt"), str(text_data["manifest"])]) == 1
    assert eval_main([str(write_tiny_checkpoint("text", tmp_path)), str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("d2v-eval: error: ") for line in err)


def test_model_files_are_evaluated_without_torch():
    import subprocess
    import sys

    code = "import sys, d2v.eval.cli, d2v.eval.probe; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_eval_checks_its_extra_before_any_work(tmp_path: Path) -> None:
    """Without scikit-learn, d2v-eval says which extra in one line and touches nothing (the model is not read)."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['sklearn'] = None\n"
            "from d2v_serve.console import eval_main\n"
            f"sys.exit(eval_main([{str(tmp_path / 'missing.onnx')!r}, {str(tmp_path / 'data')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (2, "", "d2v-eval needs the eval extra: pip install 'd2v[eval]'\n")
    r = subprocess.run([sys.executable, "-c", "import sys; sys.modules['matplotlib'] = None; import d2v.eval"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1] == ("ModuleNotFoundError: d2v.eval needs the eval extra (matplotlib is missing): "
                                         "pip install 'd2v[eval]'")
