"""Rebuild the bundled demo models from scratch: make a small corpus, pretrain with d2v-train, export with d2v-export.

    .venv/bin/python scripts/build_demo_models.py            # writes d2v_serve/demo_models/demo-{audio,image,text}.onnx

The corpus is made here, deterministically: speech synthesised by espeak-ng from demo/sentences.txt, shapes drawn
with pillow, and documents assembled from the same sentences. Training is seeded, so a rebuild gives the same models.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
SENTENCES = ROOT / "demo" / "sentences.txt"
OUT_DIR = ROOT / "d2v_serve" / "demo_models"
VOICES = ["en-us", "en-gb", "en-us+f3", "en-gb-x-rp+m3"]
SPEEDS = [140, 175]
STEPS = {"audio": 300, "image": 400, "text": 600}


def sentences() -> list[str]:
    return [line.strip() for line in SENTENCES.read_text(encoding="utf-8").splitlines() if line.strip()]


def make_text(directory: Path, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = sentences()
    docs = []
    for _ in range(1500):  # documents of one to four sentences
        docs.append(" ".join(rng.sample(lines, rng.randint(1, 4))))
    path = directory / "text" / "corpus.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return path.parent


def make_audio(directory: Path) -> Path:
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        sys.exit("build_demo_models: espeak-ng is not installed (apt-get install espeak-ng)")
    out = directory / "audio"
    out.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(sentences()):
        for voice in VOICES:
            for speed in SPEEDS:
                wav = out / f"{i:03d}-{voice.replace('+', '_')}-{speed}.wav"
                subprocess.run([espeak, "-v", voice, "-s", str(speed), "-w", str(wav), text], check=True)
    return out


def make_images(directory: Path, count: int = 2000, size: int = 96, seed: int = 0) -> Path:
    rng = random.Random(seed)
    out = directory / "image"
    out.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        background = tuple(rng.randrange(256) for _ in range(3))
        img = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randint(1, 4)):
            color = tuple(rng.randrange(256) for _ in range(3))
            x0, y0 = rng.randrange(size - 16), rng.randrange(size - 16)
            x1, y1 = x0 + rng.randint(12, size - x0), y0 + rng.randint(12, size - y0)
            shape = rng.choice(["ellipse", "rectangle", "polygon", "line"])
            if shape == "ellipse":
                draw.ellipse((x0, y0, x1, y1), fill=color)
            elif shape == "rectangle":
                draw.rectangle((x0, y0, x1, y1), fill=color)
            elif shape == "polygon":
                draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=color)
            else:
                draw.line((x0, y0, x1, y1), fill=color, width=rng.randint(2, 6))
        img.save(out / f"{i:04d}.png")
    return out


def run(cmd: list[str], cwd: Path) -> None:
    print(f"+ (cd {cwd} &&", " ".join(cmd) + ")", flush=True)
    subprocess.run(cmd, check=True, cwd=cwd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "demo", help="corpus and checkpoints go here")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="where the .onnx demo models are written")
    parser.add_argument("--modalities", nargs="+", default=["audio", "image", "text"])
    parser.add_argument("--steps", type=int, default=None, help="override the training steps of every modality")
    args = parser.parse_args(argv)

    bin_dir = Path(sys.executable).parent
    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    work, out = args.work.resolve(), args.out.resolve()
    makers = {"audio": make_audio, "image": make_images, "text": make_text}
    for modality in args.modalities:
        t0 = time.perf_counter()
        data = makers[modality](work / "corpus")
        run_dir = work / f"train-{modality}"
        shutil.rmtree(run_dir, ignore_errors=True)
        steps = args.steps or STEPS[modality]
        # relative paths: the checkpoint records them, and it should not depend on where the work folder is
        run([str(bin_dir / "d2v-train"), "--modality", modality, "--data", str(data.relative_to(work)),
             "--preset", "tiny", "--recipe", "short", "--steps", str(steps), "--out", run_dir.name, "--seed", "0",
             "--no-progress"], work)
        out.mkdir(parents=True, exist_ok=True)
        onnx = out / f"demo-{modality}.onnx"
        run([str(bin_dir / "d2v-export"), str(run_dir / "ckpt.pt"), "-o", str(onnx)], work)
        digest = hashlib.sha256(onnx.read_bytes()).hexdigest()
        print(f"{modality}: corpus + {steps} steps + export in {time.perf_counter() - t0:.0f} s; "
              f"{onnx.name} sha256 {digest}", flush=True)
    print(f"demo models rebuilt in {time.perf_counter() - started:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
