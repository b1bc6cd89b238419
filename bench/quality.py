"""Does pretraining learn? Build three small labelled sets offline, pretrain `tiny` on each unlabelled train split,
and probe the pretrained encoder beside its initial weights (d2v-eval) and beside simple hand-made features.

    .venv/bin/python -m bench.quality --out runs/quality                  # all three modalities, docs/quality.md's runs
    .venv/bin/python -m bench.quality --out runs/quality --modality text --steps 3000 --set lr=1e-3

The data are made here, never downloaded:
- image: scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes), upscaled to 64x64 PNGs;
- audio: ten spoken words synthesised by espeak-ng with 6 voices x 3 speeds x 4 pitches (720 clips, 10 classes);
- text: one to three template sentences per document over six topics (30 topic words each), a quarter of the
  sentences drawn from another topic, so that no single word decides a document.
Each set is split once (seed 0): the train split is the unlabelled pretraining data, the held-out split is what the
probes see (stratified 5-fold cross-validation inside it). Results go to OUT/quality.json and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent

from d2v.eval.cli import evaluate  # noqa: E402

STEPS = {"image": 2500, "audio": 2000, "text": 3000}  # each a few minutes on one free CPU core
# Per-modality `d2v-train --set` overrides for these runs: a few thousand updates of `tiny`, the short recipe's kind
# of run (`--recipe short`, docs/research.md); the reference defaults are tuned for 400k updates of `base`.
RECIPE: dict[str, list[str]] = {"image": ["recipe=short"], "audio": ["recipe=short"], "text": ["recipe=short"]}

# ---------------------------------------------------------------------------------------------------- text

TOPICS = {
    "sport": "team match goal player coach ball season league striker referee stadium trophy keeper tournament medal "
             "race runner sprint whistle pitch fans jersey captain penalty tackle champion bat racket net court",
    "food": "soup bread cheese oven recipe kitchen sauce garlic onion dinner chef salad butter pasta rice pepper flour "
            "pan spoon lunch dessert cake honey lemon tomato noodle grill bakery menu meal",
    "weather": "rain storm cloud wind snow sun thunder fog forecast sky temperature frost hail drizzle breeze "
               "lightning flood drought humidity blizzard rainbow heatwave gust mist ice puddle umbrella tornado "
               "climate season",
    "music": "song guitar piano band concert singer drum melody album chorus violin stage rhythm tune lyrics orchestra "
             "choir trumpet bass note chord festival record microphone opera jazz composer playlist ballad harmony",
    "computer": "server code program laptop network screen keyboard file database bug memory software password browser "
                "cloud update router chip printer mouse backup website app kernel script disk cache pixel login cable",
    "garden": "rose tree seed soil flower leaf root shovel hedge lawn tulip weed compost fence greenhouse bush petal "
              "branch orchard vine hose mower bulb pot blossom moss pond daisy ivy berry",
}
VERBS = "saw liked moved found brought checked watched noticed mentioned described fixed cleaned".split()
ADJECTIVES = "big small new old good bad nice strange red blue quiet busy".split()
NAMES = "anna ben carla david emma frank grace henry ivan julia".split()
TIMES = ["today", "yesterday", "again", "every week", "at noon", "last night", "on sunday", "before lunch"]
TEMPLATES = [
    "the {a} {n} was near the {n2}",
    "{name} said the {n} looked {a}",
    "yesterday {name} {v} the {n} and the {n2}",
    "we {v} a {a} {n} {t}",
    "after the {n} , {name} {v} the {n2}",
    "i think the {n2} is more {a} than the {n}",
    "{name} and {name2} {v} the {n} {t}",
    "there was a {a} {n} {t}",
]


def _sentence(rng: random.Random, topic: str) -> str:
    words = TOPICS[topic].split()
    return rng.choice(TEMPLATES).format(n=rng.choice(words), n2=rng.choice(words), v=rng.choice(VERBS),
                                        a=rng.choice(ADJECTIVES), name=rng.choice(NAMES), name2=rng.choice(NAMES),
                                        t=rng.choice(TIMES))


def _document(rng: random.Random, topic: str, noise: float = 0.25) -> str:
    picks = [topic if rng.random() > noise else rng.choice(list(TOPICS)) for _ in range(rng.randint(1, 3))]
    return " . ".join(_sentence(rng, t) for t in picks) + " ."


def build_text(out: Path, n_train: int = 6000, n_eval: int = 1200, seed: int = 0) -> tuple[Path, Path]:
    """train.txt (one unlabelled document per line) and eval.jsonl (text, label)."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    topics = list(TOPICS)
    train = out / "train.txt"
    train.write_text("".join(_document(rng, rng.choice(topics)) + "\n" for _ in range(n_train)), encoding="utf-8")
    labelled = out / "eval.jsonl"
    labelled.write_text("".join(json.dumps({"text": _document(rng, topics[i % len(topics)]),
                                            "label": topics[i % len(topics)]}) + "\n" for i in range(n_eval)),
                        encoding="utf-8")
    return train, labelled


def text_features(labelled: Path) -> tuple[np.ndarray, list[str]]:
    """Word counts (a bag of words)."""
    from sklearn.feature_extraction.text import CountVectorizer

    rows = [json.loads(line) for line in labelled.read_text(encoding="utf-8").splitlines()]
    counts = CountVectorizer().fit_transform([r["text"] for r in rows]).toarray().astype(np.float32)
    return counts, [r["label"] for r in rows]


# ---------------------------------------------------------------------------------------------------- image


def build_image(out: Path, n_eval: int = 500, size: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """scikit-learn's digits as size x size PNGs: train/ (unlabelled) and eval/<digit>/ (labelled)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.images))
    for i, k in enumerate(order):
        pixels = (digits.images[k] * (255 / 16)).astype(np.uint8)
        img = Image.fromarray(pixels, "L").resize((size, size), Image.Resampling.BILINEAR).convert("RGB")
        folder = out / "eval" / str(digits.target[k]) if i < n_eval else out / "train"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{k:04d}.png")
    return out / "train", out / "eval"


def image_features(labelled: Path) -> tuple[np.ndarray, list[str]]:
    """Raw pixels at 16x16 grey."""
    files = sorted(labelled.glob("*/*.png"))
    x = np.stack([np.asarray(Image.open(f).convert("L").resize((16, 16)), np.float32).ravel() for f in files])
    return x, [f.parent.name for f in files]


# ---------------------------------------------------------------------------------------------------- audio

WORDS = ["yes", "no", "up", "down", "left", "right", "stop", "go", "seven", "zero"]
VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-029", "en-us+f3", "en-gb-x-rp+m3"]
SPEEDS = [130, 165, 200]
PITCHES = [35, 50, 65, 80]


def build_audio(out: Path, eval_fraction: float = 0.34, seed: int = 0) -> tuple[Path, Path]:
    """espeak-ng words: train/ (unlabelled) and eval/<word>/ (labelled), split at random across clips."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        sys.exit("quality: espeak-ng is not installed (apt-get install espeak-ng)")
    rng = random.Random(seed)
    for word in WORDS:
        for voice in VOICES:
            for speed in SPEEDS:
                for pitch in PITCHES:
                    name = f"{word}-{voice.replace('+', '_')}-{speed}-{pitch}.wav"
                    folder = out / "eval" / word if rng.random() < eval_fraction else out / "train"
                    folder.mkdir(parents=True, exist_ok=True)
                    subprocess.run([espeak, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w",
                                    str(folder / name), word], check=True, capture_output=True)
    return out / "train", out / "eval"


def audio_features(labelled: Path) -> tuple[np.ndarray, list[str]]:
    """Log power in 40 bands (16 kHz STFT, 25 ms / 10 ms): mean and std over time, plus the duration."""
    import soxr

    from d2v_serve.preprocess import decode_audio

    files = sorted(labelled.glob("*/*.wav"))
    feats = []
    for f in files:
        x, rate = decode_audio(f)
        x = soxr.resample(x, rate, 16000) if rate != 16000 else x
        frames = np.lib.stride_tricks.sliding_window_view(x, 400)[::160] * np.hanning(400)
        power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
        bands = np.log(np.stack([b.sum(1) for b in np.array_split(power, 40, axis=1)], 1) + 1e-8)
        feats.append(np.concatenate([bands.mean(0), bands.std(0), [len(x) / 16000]]))
    return np.stack(feats).astype(np.float32), [f.parent.name for f in files]


BUILDERS = {"image": (build_image, image_features), "audio": (build_audio, audio_features),
            "text": (build_text, text_features)}


# ---------------------------------------------------------------------------------------------------- runs


def pretrain(modality: str, data: Path, out: Path, steps: int, sets: list[str], seed: int) -> float:
    """d2v-train on the unlabelled split (a fresh run directory); returns the wall time in seconds."""
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "d2v.training.cli", "--modality", modality, "--data", str(data), "--preset", "tiny",
           "--steps", str(steps), "--out", str(out), "--seed", str(seed), "--log-every", "10", "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    print("$ d2v-train " + " ".join(cmd[3:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - start


def run_modality(modality: str, out: Path, steps: int, sets: list[str], seed: int) -> dict:
    build, features = BUILDERS[modality]
    data_dir = out / "data" / modality
    if data_dir.exists():
        shutil.rmtree(data_dir)
    train, labelled = build(data_dir)
    run = out / "runs" / modality
    wall = pretrain(modality, train, run, steps, sets, seed)
    plot = out / f"{modality}-pca.png"
    start = time.perf_counter()
    report = evaluate(run / "ckpt.pt", labelled, baseline="auto", plot=plot)
    eval_s = time.perf_counter() - start
    x, y = features(labelled)
    from d2v.eval.probe import linear_probe

    hand = linear_probe(x, y)
    result = {"modality": modality, "steps": steps, "sets": sets, "seed": seed, "train_wall_s": round(wall, 1),
              "eval_wall_s": round(eval_s, 1), "items": report["items"], "classes": len(report["classes"]),
              "pretrained": {r: p["accuracy"] for r, p in report["models"]["pretrained"].items()},
              "initial": {r: p["accuracy"] for r, p in report["models"]["initial"].items()},
              "hand_made": hand.accuracy, "curves": str(run / "curves.png"), "pca": str(plot)}
    print(report["report"], flush=True)
    print(f"hand-made features: {hand.accuracy:.3f}", flush=True)
    return result


def table(results: list[dict]) -> str:
    rows = ["| modality | steps | train wall (s) | initial weights (last / target) | pretrained (last / target) | "
            "hand-made features |", "|---|---|---|---|---|---|"]
    for r in results:
        fmt = lambda d: " / ".join(f"{d[k]:.3f}" for k in ("last", "target") if k in d)  # noqa: E731
        rows.append(f"| {r['modality']} | {r['steps']} | {r['train_wall_s']:.0f} | {fmt(r['initial'])} | "
                    f"{fmt(r['pretrained'])} | {r['hand_made']:.3f} |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/quality", help="data, runs, plots and quality.json (default runs/quality)")
    p.add_argument("--modality", action="append", choices=list(BUILDERS), help="repeatable (default: all three)")
    p.add_argument("--steps", type=int, help="pretraining updates (default: image 2500, audio 2000, text 3000)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra d2v-train --set, after the modality's recipe (repeatable)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for modality in args.modality or list(BUILDERS):
        steps = args.steps or STEPS[modality]
        results.append(run_modality(modality, out, steps, RECIPE[modality] + args.set, args.seed))
    (out / "quality.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
