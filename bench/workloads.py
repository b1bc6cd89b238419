"""The bench's workloads: which model, what inputs (made here, distinct), and what one item is worth."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from d2v_serve.client import Image, Pcm
from d2v_serve.models.model_file import ModelFileMeta
from d2v_serve.preprocess import preprocessing_from_dict

WORDS = ("the of and to in is was for that with as by on from at are this his an be which or had not it have "
         "first new were also one two after their its but has more who all other time they been years into "
         "city world school music states during played film series later team").split()
SAMPLE_RATE = 16000


@dataclass(frozen=True)
class Workload:
    name: str
    modality: str  # text | audio | image
    model: str  # model file name without .onnx (bench/models.py builds them)
    tokens: int = 0  # text: tokens per input, <s> and </s> included
    seconds: tuple[float, float] = (0.0, 0.0)  # audio: clip length, drawn uniformly from [lo, hi]
    pool: int = 512  # distinct inputs made up front; beyond it each reuse is varied (rotated words, shifted samples)

    @property
    def unit(self) -> str:
        return {"text": "tokens", "audio": "audio_s", "image": "images"}[self.modality]

    def inputs(self, meta: ModelFileMeta, n: int, seed: int = 0) -> list[Any]:
        """n distinct inputs for the model described by `meta` (its tokenizer sets the text lengths)."""
        rng = np.random.default_rng(seed)
        if self.modality == "text":
            return texts(meta, self.tokens, n, rng)
        if self.modality == "audio":
            lo, hi = self.seconds
            return [Pcm((0.1 * rng.standard_normal(int(rng.uniform(lo, hi) * SAMPLE_RATE))).astype(np.float32),
                        SAMPLE_RATE) for _ in range(n)]
        return images(meta.image_size, n, rng)

    def distinct(self, calls: int, pool: int) -> int:
        """How many of `calls` inputs differed, given `pool` made up front and `variant` on reuse."""
        if self.modality == "text":
            return min(calls, pool * 2 * max(1, self.tokens - 2))  # ~one word per token, specials aside
        return calls if self.modality == "audio" else min(calls, pool)

    def units(self, meta: ModelFileMeta, item: Any) -> float:
        """What one input counts for in `unit`: its tokens, its seconds of audio, one image."""
        return self.mean_units(meta, [item])

    def mean_units(self, meta: ModelFileMeta, items: list[Any]) -> float:
        """The mean of `units` over `items` (the tokenizer is built once, not per input)."""
        if self.modality == "text":
            pre = preprocessing_from_dict("text", meta.preprocessing)
            return sum(float(len(pre.prepare(item))) for item in items) / len(items)
        if self.modality == "audio":
            return sum(len(item.samples) / item.sample_rate for item in items) / len(items)
        return 1.0


WORKLOADS = {w.name: w for w in (
    Workload("text-12", "text", "text", tokens=12, pool=4096),
    Workload("text-128", "text", "text", tokens=128, pool=1024),
    Workload("audio-2s", "audio", "audio", seconds=(2.0, 2.0), pool=256),
    Workload("audio-mixed", "audio", "audio", seconds=(0.5, 10.0), pool=192),
    Workload("text-12-int8", "text", "text-int8", tokens=12, pool=4096),
    Workload("image", "image", "image", pool=128),
)}


def parse_workloads(text: str, allowed: dict[str, Workload] | None = None) -> list[Workload]:
    """'text-12,audio-2s' -> the workloads; ValueError naming the unknown ones."""
    table = WORKLOADS if allowed is None else allowed
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown or not names:
        raise ValueError(f"unknown workload(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(table)}")
    return [table[n] for n in names]


def texts(meta: ModelFileMeta, tokens: int, n: int, rng: np.random.Generator) -> list[str]:
    """n distinct random sentences of `tokens` tokens (or the nearest above) under the model's tokenizer."""
    pre = preprocessing_from_dict("text", meta.preprocessing)
    limit = min(pre.max_length, (meta.max_positions or pre.max_length))
    if tokens > limit:
        raise ValueError(f"the text model takes at most {limit} tokens, the workload needs {tokens}")
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        words = [str(w) for w in rng.choice(WORDS, size=tokens)]
        lo, hi = 1, len(words)  # shortest prefix with >= tokens tokens (each word is at least one token)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(pre.tokenizer.encode(" ".join(words[:mid])).ids) >= tokens:
                hi = mid
            else:
                lo = mid + 1
        text = " ".join(words[:lo])
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def images(size: int, n: int, rng: np.random.Generator) -> list[Image]:
    """n distinct PNG images of size x size: smooth random colour fields (noise would make huge files)."""
    from PIL import Image as PILImage

    out = []
    for _ in range(n):
        small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        img = PILImage.fromarray(small).resize((size, size), PILImage.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(Image(buf.getvalue()))
    return out


def variant(item: Any, k: int) -> Any:
    """The k-th variation of an input, so a reused pool still sends distinct inputs (k = 0: itself)."""
    if k == 0:
        return item
    if isinstance(item, str):  # rotated, then reversed and rotated: 2 x words variants of the same length
        words = item.split()
        shift, flip = k % len(words), (k // len(words)) % 2
        words = words[shift:] + words[:shift]
        return " ".join(reversed(words) if flip else words)
    if isinstance(item, Pcm):
        return Pcm(np.roll(item.samples, 97 * k), item.sample_rate)
    return item  # images: encoded files are reused as they are
