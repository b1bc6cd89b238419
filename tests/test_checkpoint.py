from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from d2v.training.checkpoint import CheckpointError, load_checkpoint, load_encoder, save_checkpoint
from d2v.training.import_hf import HFImportError, import_hf
from d2v.training.import_hf import main as import_main
from tests.factories import tiny_checkpoint, write_tiny_checkpoint
from tests.hf_models import hf_audio, hf_image, hf_text


@pytest.mark.parametrize("modality", ["audio", "image", "text"])
def test_round_trip_gives_the_same_function(tmp_path, modality):
    ckpt = tiny_checkpoint(modality)
    path = save_checkpoint(tmp_path / "m.pt", ckpt)
    loaded = load_checkpoint(path)
    assert loaded["modality"] == modality and loaded["config"] == ckpt["config"]
    assert loaded["preprocessing"] == ckpt["preprocessing"]
    a, b = load_encoder(ckpt), load_encoder(loaded)
    inputs = {"audio": (torch.randn(1, 4000),), "image": (torch.randn(1, 3, 64, 64),),
              "text": (torch.tensor([[0, 40, 50, 2]]),)}[modality]
    with torch.no_grad():
        assert torch.equal(a(*inputs).last_hidden_state, b(*inputs).last_hidden_state)
    # it really is a weights-only file: plain torch.load with weights_only=True opens it
    assert torch.load(path, weights_only=True)["format"] == "d2v-checkpoint"


def test_truncated_file_gives_one_line_error(tmp_path):
    path = write_tiny_checkpoint("audio", tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value) and "truncated" in str(e.value)


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint", b"PK\x03\x04garbage"])
def test_foreign_files_give_one_line_error(tmp_path, content):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


def test_foreign_torch_file_and_pickled_code_are_refused(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a d2v checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save({"format": "d2v-checkpoint", "obj": subprocess.Popen}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(tmp_path / "evil.pt")


def test_missing_file_and_newer_version(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "nope.pt")
    ckpt = tiny_checkpoint("audio")
    ckpt["format_version"] = 99
    save_checkpoint(tmp_path / "new.pt", ckpt)
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(tmp_path / "new.pt")


def test_atomic_save_leaves_no_temp_files(tmp_path):
    save_checkpoint(tmp_path / "a.pt", tiny_checkpoint("image"))
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]


@pytest.mark.parametrize("builder", [hf_audio, hf_image, hf_text], ids=["audio", "image", "text"])
def test_import_cli_writes_a_checkpoint(tmp_path, builder, capsys):
    hf_dir = builder(tmp_path / "hf")
    assert import_main([str(hf_dir), "-o", str(tmp_path / "out.pt")]) == 0
    assert load_checkpoint(tmp_path / "out.pt")["config"]["num_layers"] == 3
    assert "imported" in capsys.readouterr().out


def test_import_refuses_unknown_and_missing_keys_with_a_list(tmp_path):
    hf_dir = hf_audio(tmp_path / "hf")
    weights = load_file(str(hf_dir / "model.safetensors"))
    weights["encoder.surprise.weight"] = torch.zeros(3)
    del weights["encoder.layers.1.final_layer_norm.bias"]
    save_file(weights, str(hf_dir / "model.safetensors"))
    with pytest.raises(HFImportError) as e:
        import_hf(hf_dir)
    message = str(e.value)
    assert "unknown keys: encoder.surprise.weight" in message
    assert "transformer.layers.1.ffn_norm.bias" in message


def test_import_drops_task_heads_and_strips_prefix(tmp_path):
    import transformers as T

    hf_dir = hf_audio(tmp_path / "hf")
    cfg = T.AutoConfig.from_pretrained(hf_dir)
    cfg.vocab_size = 12
    ctc = T.Data2VecAudioForCTC(cfg)
    ctc.data2vec_audio.load_state_dict(T.AutoModel.from_pretrained(hf_dir).state_dict())
    ctc.save_pretrained(tmp_path / "ctc")
    (tmp_path / "ctc" / "preprocessor_config.json").write_text((hf_dir / "preprocessor_config.json").read_text())
    ckpt, dropped = import_hf(tmp_path / "ctc")
    assert dropped == ["lm_head.bias", "lm_head.weight"]
    plain, _ = import_hf(hf_dir)
    assert all(torch.equal(plain["model"][k], ckpt["model"][k]) for k in plain["model"])


def test_import_cli_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run([sys.executable, "-m", "d2v.training.import_hf", str(tmp_path / "empty"), "-o",
                             str(tmp_path / "x.pt")], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "no config.json" in result.stderr
    assert not (tmp_path / "x.pt").exists()


class _Payload:
    """Unpickling this would create a file: the marker that the pickle ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_import_cli_refuses_hostile_weights_in_one_line(tmp_path):
    """A pickle that would run code, a foreign pickle, a foreign safetensors file: one line, exit 1, nothing run."""
    marker = tmp_path / "pwned"
    hf_dir = hf_text(tmp_path / "hf")
    (hf_dir / "model.safetensors").unlink()

    def import_error() -> str:
        result = subprocess.run([sys.executable, "-m", "d2v.training.import_hf", str(hf_dir), "-o",
                                 str(tmp_path / "x.pt")], capture_output=True, text=True)
        assert result.returncode == 1 and result.stderr.strip().count("\n") == 0, result.stderr
        return result.stderr

    torch.save({"w": _Payload(str(marker))}, hf_dir / "pytorch_model.bin")
    error = import_error()
    assert "pytorch_model.bin: refused: the pickle holds more than weights" in error
    assert "nothing in it was run" in error
    (hf_dir / "pytorch_model.bin").write_bytes(b"\x80\x04" + b"junk" * 10)
    assert "pytorch_model.bin: not a readable PyTorch weights file" in import_error()
    (hf_dir / "model.safetensors").write_bytes(b"\xff" * 64)
    assert "model.safetensors: not a readable safetensors file" in import_error()
    assert not marker.exists() and not (tmp_path / "x.pt").exists()
