"""Random-weight preset models for the bench, exported by `d2v-export` and cached (runs/bench-models/PRESET/).

Each model file is `NAME.onnx` (text, text-int8, audio, audio-fp16, image, ...) next to the checkpoint it came
from (`MODALITY.pt`) and its encoder config (`MODALITY.config.json`, for FLOP counts without torch).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / "runs" / "bench-models"
PRECISION_FLAGS = {"fp32": [], "int8": ["--int8"], "fp16": ["--fp16"]}


def split_name(name: str) -> tuple[str, str]:
    """'text-int8' -> ('text', 'int8'); 'audio' -> ('audio', 'fp32')."""
    modality, _, precision = name.partition("-")
    precision = precision or "fp32"
    if modality not in ("text", "audio", "image") or precision not in PRECISION_FLAGS:
        raise ValueError(f"bad bench model name {name!r} (MODALITY[-int8|-fp16])")
    return modality, precision


def write_checkpoint(modality: str, preset: str, directory: Path) -> Path:
    """A random `preset` checkpoint (standard config; text: a 2,000-token BPE vocabulary) and its config JSON."""
    import torch

    from bench.workloads import WORDS
    from d2v.training.checkpoint import make_checkpoint, save_checkpoint
    from d2v.training.models import EncoderConfig, build_encoder
    from d2v.training.models.init import init_weights
    from d2v_serve.preprocess import AudioPreprocessing, ImagePreprocessing, train_bpe_tokenizer

    cfg = EncoderConfig.preset(modality, preset)
    if modality == "text":
        corpus = [" ".join(np.random.default_rng(i).choice(WORDS, size=40)) for i in range(400)]
        pre = train_bpe_tokenizer(corpus, vocab_size=2000, min_frequency=1)
        cfg = cfg.replace(vocab_size=pre.vocab_size)
        pre_dict = pre.to_dict()
        pre_dict["max_length"] = cfg.max_positions - cfg.pad_id - 1
    elif modality == "audio":
        pre_dict = AudioPreprocessing().to_dict()
    else:
        pre_dict = ImagePreprocessing(image_size=cfg.image_size, resize_size=cfg.image_size).to_dict()
    torch.manual_seed(0)
    encoder = init_weights(build_encoder(cfg))
    (directory / f"{modality}.config.json").write_text(json.dumps(cfg.to_dict()) + "\n")
    return save_checkpoint(directory / f"{modality}.pt", make_checkpoint(cfg, encoder.state_dict(), pre_dict))


def source_digest() -> str:
    """sha256 of the code a model file depends on (encoders, checkpoints, export)."""
    digest = hashlib.sha256()
    for path in sorted([*(ROOT / "training").rglob("*.py"), *(ROOT / "export").rglob("*.py")]):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def ensure_models(names: list[str], preset: str = "base", root: Path = DEFAULT_DIR,
                  say=lambda m: print(m, file=sys.stderr)) -> Path:
    """The folder holding `names`, built when missing (minutes for base models) and rebuilt when the encoder or
    export code changed since."""
    directory = root / preset
    directory.mkdir(parents=True, exist_ok=True)
    stamp, digest = directory / "source.sha256", source_digest()
    if not stamp.exists() or stamp.read_text().strip() != digest:
        for old in [*directory.glob("*.onnx"), *directory.glob("*.pt"), *directory.glob("*.config.json")]:
            old.unlink()
        stamp.write_text(digest + "\n")
    export = str(Path(sys.executable).with_name("d2v-export"))
    for name in names:
        out = directory / f"{name}.onnx"
        if out.exists():
            continue
        modality, precision = split_name(name)
        ckpt = directory / f"{modality}.pt"
        if not ckpt.exists():
            say(f"bench: writing a random {preset} {modality} checkpoint")
            write_checkpoint(modality, preset, directory)
        say(f"bench: exporting {name} ({preset}) with d2v-export")
        subprocess.run([export, str(ckpt), "-o", str(out), "-q", *PRECISION_FLAGS[precision]], check=True,
                       stdout=subprocess.DEVNULL)
    return directory


def encoder_config(directory: Path, modality: str) -> dict:
    return json.loads((directory / f"{modality}.config.json").read_text())
