"""Training throughput (samples/s) of d2v-train's update step, per modality and preset, as a markdown table.

    .venv/bin/python -m bench.train_throughput                                  # tiny + small, all modalities
    .venv/bin/python -m bench.train_throughput --presets base --device cuda --batch-size 16
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.train_throughput --modalities audio --presets tiny --batch-size 0 \
        --objective data2vec2 --front-end       # the objective's own batch; the conv front end's share of an update
    .venv/bin/python -m bench.train_throughput --modalities audio --conv1d-front-end   # the front end as Conv1d

Data is synthetic and made here (tones, drawn shapes, sentences), decoded by the real data pipeline. Each cell
builds a Trainer, runs `--warmup` updates, then times `--steps` updates (forward, backward, optimizer, EMA,
data decoding in background threads). Items: audio crops of `--audio-seconds`, images at the preset's size,
text pieces of `--text-tokens` tokens. Not a test: numbers depend on the machine and what else runs on it.
`--front-end` (audio) adds the share of an update spent in the conv feature extractor: its forward time (hooks) plus
its backward (the update timed again with the extractor frozen, the difference). `--batch-size 0` keeps the
objective's own batch size.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from PIL import Image, ImageDraw

from d2v.training.config import resolve_config, set_assignment
from d2v.training.models.audio import AudioEncoder
from d2v.training.trainer import Trainer

WORDS = ("the a teacher student model learns sees hears masked view speech image text river stone house moon "
         "boat tree letter garden quiet bright small long every morning night slowly with care").split()


def make_data(root: Path, count: int = 32, seed: int = 0) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    (root / "wav").mkdir()
    (root / "img").mkdir()
    for i in range(count):
        t = np.arange(16000 * 4) / 16000
        phase = 2 * np.pi * np.cumsum(rng.uniform(100, 300) * (1 + t * rng.uniform(0, 1))) / 16000
        x = sum(np.sin(k * phase) / k for k in range(1, 6)) + 0.01 * rng.standard_normal(len(t))
        sf.write(root / "wav" / f"{i}.wav", (0.3 * x / np.abs(x).max()).astype(np.float32), 16000)
        img = Image.new("RGB", (288, 256), tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = (int(v) for v in rng.integers(0, 200, 2))
            draw.ellipse([x0, y0, x0 + 60, y0 + 50], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        img.save(root / "img" / f"{i}.png")
    docs = [" ".join(rng.choice(WORDS, 600)) for _ in range(count * 4)]
    (root / "txt").mkdir()
    (root / "txt" / "corpus.txt").write_text("\n".join(docs) + "\n")
    return {"audio": root / "wav", "image": root / "img", "text": root / "txt"}


def timed(trainer: Trainer, steps: int) -> float:
    """Seconds per update over `steps` updates."""
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    sync()
    return (time.perf_counter() - start) / steps


def front_end_share(trainer: Trainer, steps: int) -> float:
    """Fraction of an audio update spent in the conv feature extractor, forward and backward."""
    blocks = trainer.objective.student.feature_extractor
    forward = {"s": 0.0}
    hooks = [blocks[0].register_forward_pre_hook(lambda m, a: forward.__setitem__("t", time.perf_counter())),
             blocks[-1].register_forward_hook(
                 lambda m, a, o: forward.__setitem__("s", forward["s"] + time.perf_counter() - forward["t"]))]
    full = timed(trainer, steps)
    for h in hooks:
        h.remove()
    for p in blocks.parameters():
        p.requires_grad_(False)
    frozen = timed(trainer, steps)
    return (forward["s"] / steps + full - frozen) / full


def measure(modality: str, preset: str, data: Path, args: argparse.Namespace, out: Path) -> dict[str, object]:
    sets = [f"preset={preset}", f"data.path={data}", f"steps={args.warmup + args.steps}", f"out={out}",
            f"device={args.device}", "progress=false", "data.bucket_batches=0"]
    if args.batch_size:
        sets.append(f"batch_size={args.batch_size}")
    if modality == "audio":
        sets.append(f"data.max_samples={int(args.audio_seconds * 16000)}")
    if modality == "text":
        sets += [f"data.text_max_length={args.text_tokens}", "data.vocab_size=2048"]
    recipe = None if args.recipe == "reference" else args.recipe
    cfg = resolve_config(modality, args.objective, recipe, [set_assignment(s) for s in sets])
    trainer = Trainer(cfg)
    for _ in range(args.warmup):
        trainer.train_step()
    samples = trainer.samples
    per_update = timed(trainer, args.steps)
    n = trainer.samples - samples
    share = front_end_share(trainer, args.steps) if args.front_end and modality == "audio" else None
    trainer.close()
    params = sum(p.numel() for p in trainer.objective.student.parameters())
    item = {"audio": f"{args.audio_seconds:g} s", "image": f"{trainer.enc_cfg.image_size}px",
            "text": f"{args.text_tokens} tok"}[modality]
    precision = str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else "fp32"
    row = {"modality": modality, "objective": args.objective, "preset": preset, "params": f"{params / 1e6:.1f}M",
           "batch": cfg.batch_size, "item": item, "device": str(trainer.device), "precision": precision,
           "samples/s": f"{n / (per_update * args.steps):.1f}", "s/update": f"{per_update:.3f}"}
    if args.front_end:
        row["front end"] = "—" if share is None else f"{share:.0%}"
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modalities", nargs="+", default=["audio", "image", "text"])
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=8, help="items per update; 0: the objective's default")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--audio-seconds", type=float, default=2.0)
    p.add_argument("--text-tokens", type=int, default=128)
    p.add_argument("--objective", default="data2vec", choices=["data2vec", "data2vec2"])
    p.add_argument("--recipe", default="short", choices=["short", "reference"],
                   help="the config timed: the short recipe (default) or the reference defaults")
    p.add_argument("--front-end", action="store_true", help="audio: the conv front end's share of an update")
    p.add_argument("--conv1d-front-end", action="store_true",
                   help="audio: train the front end as Conv1d blocks, as d2v-train did before it trained the MatMul "
                        "form (for the side-by-side in docs/benchmarks.md)")
    args = p.parse_args()
    if args.conv1d_front_end:
        AudioEncoder.conv_features = AudioEncoder.conv1d_features  # whether or not gradients flow
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp))
        for preset in args.presets:
            for modality in args.modalities:
                rows.append(measure(modality, preset, data[modality], args, Path(tmp) / f"run-{modality}-{preset}"))
                print(f"done {modality} {preset}: {rows[-1]['samples/s']} samples/s", file=sys.stderr)
    keys = list(rows[0])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} timed updates after "
          f"{args.warmup} warm-up\n")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
