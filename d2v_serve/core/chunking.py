"""Long inputs in windows: plan overlapping windows over a waveform or a token sequence, and join the windows'
outputs into the whole input's output.

Each window runs as an ordinary batch item. Its output positions map onto the whole input's positions by an offset
(audio: windows start on multiples of the conv front end's stride, so a window's frame j is the input's frame
start / stride + j; text: a window is <s> + tokens + </s>, and its specials fall where the neighbours' tokens are).
Joining takes each position from the window where it lies furthest from an edge, which cuts every overlap at its
midpoint; the pooled output is the length-weighted mean of those kept positions, i.e. exactly the mean of the
stitched per-position output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..preprocess import audio_frames, max_text_chars, min_audio_samples

# Audio window when a model file does not record its training crop: fairseq's data2vec / wav2vec 2.0 crop,
# 250 000 samples at 16 kHz.
DEFAULT_AUDIO_WINDOW_S = 15.625
DEFAULT_AUDIO_OVERLAP_S = 1.0
DEFAULT_TEXT_OVERLAP = 64  # tokens


@dataclass(frozen=True, slots=True)
class ChunkDefaults:
    """A model's chunking settings: the default window and overlap (audio seconds; text tokens incl. <s> and </s>)
    and the longest chunked input: audio seconds, checked from the header before decoding; text characters,
    checked before tokenizing, then tokens."""

    window: float
    overlap: float
    max_seconds: float = 0.0
    max_chars: int = 0
    max_tokens: int = 0


def audio_defaults(training_crop_seconds: float | None, sample_rate: int, max_audio_seconds: float,
                   max_chunked_seconds: float) -> ChunkDefaults:
    """The model file's training crop (recorded at export; DEFAULT_AUDIO_WINDOW_S for files without it), within
    the server's --max-audio-seconds."""
    window = min(float(training_crop_seconds or DEFAULT_AUDIO_WINDOW_S), max_audio_seconds)
    return ChunkDefaults(window, min(DEFAULT_AUDIO_OVERLAP_S, window / 2), max_seconds=max_chunked_seconds)


def text_defaults(max_tokens: int, max_chunked_tokens: int, max_chars: int = 0) -> ChunkDefaults:
    """The model's max tokens per window, overlapping by 64 tokens (by half a window's tokens for models with
    fewer than 130 positions); characters before tokenizing: `max_chars` (--max-text-chars) or as many as
    max_chunked_tokens tokens may take."""
    return ChunkDefaults(float(max_tokens), float(min(DEFAULT_TEXT_OVERLAP, (max_tokens - 2) // 2)),
                         max_chars=max_chars or max_text_chars(max_chunked_tokens), max_tokens=max_chunked_tokens)


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    """A request's chunking in model units: window and overlap (audio samples at the model's rate; text tokens incl.
    <s> and </s> for the window, shared tokens for the overlap), the model's limits (ChunkDefaults), and whether
    the per-window breakdown was asked for."""

    window: int
    overlap: int
    max_seconds: float = 0.0
    max_chars: int = 0
    max_length: int = 0  # text tokens
    details: bool = False


@dataclass(frozen=True, slots=True)
class Window:
    """One window of an input. `start`/`end`: its span of the input (audio samples at the model's rate; text
    tokens without the specials); `offset`: the whole input's position of the window's position 0; `positions`: its
    valid output positions; `keep`: the whole input's positions [a, b) taken from this window when joining."""

    start: int
    end: int
    offset: int
    positions: int
    keep: tuple[int, int] = (0, 0)

    @property
    def local_keep(self) -> tuple[int, int]:
        """`keep` in the window's own positions."""
        return self.keep[0] - self.offset, self.keep[1] - self.offset


def _starts(length: int, window: int, hop: int, align: int) -> list[int]:
    """Window starts over `length` units: every `hop` while a window ends before the input does, then a last one
    ending at the input's end (moved back to a multiple of `align`, so it is as long as the others or a little
    shorter)."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window, hop))
    starts.append(-(-(length - window) // align) * align)
    return starts


def _with_keeps(windows: list[Window], total: int) -> list[Window]:
    """Each window's kept positions: cut every overlap at its midpoint (a position goes to the window where it lies
    further from an edge; a tie to the earlier window)."""
    cuts = [0]
    for left, right in zip(windows, windows[1:], strict=False):
        cut = (right.offset + left.offset + left.positions + 1) // 2
        cuts.append(min(max(cut, cuts[-1], right.offset), left.offset + left.positions))
    cuts.append(total)
    return [Window(w.start, w.end, w.offset, w.positions, (cuts[i], max(cuts[i], cuts[i + 1])))
            for i, w in enumerate(windows)]


def audio_windows(samples: int, window: int, overlap: int, conv_layers: Sequence[Sequence[int]]) -> list[Window]:
    """Windows of `window` samples overlapping by about `overlap` samples over an input of `samples`. Both round
    to the front end's stride, and the overlap grows to at least one frame (a frame sees more samples than its
    stride, so windows that only touch would lose the frame between them). Raises ValueError when the window is
    shorter than one frame's receptive field or not longer than the overlap."""
    stride = int(np.prod([s for _dim, _kernel, s in conv_layers]))
    if samples <= window:
        frames = int(audio_frames(samples, conv_layers))
        return [Window(0, samples, 0, frames, (0, frames))]
    window = window // stride * stride
    if window < min_audio_samples(conv_layers):
        raise ValueError(f"the window must be at least {min_audio_samples(conv_layers)} samples (one frame)")
    overlap = round(overlap / stride) * stride
    frames = int(audio_frames(window, conv_layers))
    hop = min(window - overlap, frames * stride)  # windows' frames must meet: hop <= frames x stride
    if hop < stride:
        raise ValueError("the overlap must be shorter than the window")
    out = []
    for start in _starts(samples, window, hop, stride):
        end = min(start + window, samples)
        out.append(Window(start, end, start // stride, int(audio_frames(end - start, conv_layers))))
    return _with_keeps(out, int(audio_frames(samples, conv_layers)))


def text_windows(tokens: int, window: int, overlap: int) -> list[Window]:
    """Windows over `tokens` tokens (specials excluded) whose model inputs are <s> + at most `window` - 2 tokens +
    </s>, consecutive windows sharing `overlap` tokens. Position p of the whole input is <s> (0), token p - 1, or
    </s> (tokens + 1). Raises ValueError when `window` leaves no room past the overlap."""
    content = window - 2
    if content - overlap < 1:
        raise ValueError("the window must exceed the overlap by at least 3 tokens (<s>, </s> and one more)")
    out = []
    for start in _starts(tokens, content, content - overlap, 1):
        end = min(start + content, tokens)
        out.append(Window(start, end, start, end - start + 2))
    return _with_keeps(out, tokens + 2)


class WindowPart:
    """A window's share of the joined output, computed from its [positions, hidden] output on the batcher's
    finishing thread: its kept rows (pooling none), their float64 sum (mean) or its first row (cls); plus, with
    `alone`, the window's own result under the request's options (the per-window breakdown)."""

    def __init__(self, window: Window, pooling: str, alone: object | None = None) -> None:
        self.window, self.pooling, self.alone = window, pooling, alone

    def __call__(self, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        a, b = self.window.local_keep
        kept = np.asarray(hidden[a:b], dtype=np.float32)
        if self.pooling == "none":
            part = np.array(kept)
        elif self.pooling == "mean":
            part = kept.sum(axis=0, dtype=np.float64)
        else:
            part = np.array(hidden[0], dtype=np.float32)
        return part, (self.alone(hidden) if self.alone is not None else None)


def join(parts: Sequence[np.ndarray], windows: Sequence[Window], pooling: str) -> np.ndarray:
    """The whole input's float32 output from its windows' parts (WindowPart values, in window order):
    [positions, hidden] stitched, or [hidden] pooled (mean: weighted by the kept positions; cls: the first
    window's first position)."""
    if pooling == "none":
        return np.concatenate(parts, axis=0)
    if pooling == "mean":
        total = sum(w.keep[1] - w.keep[0] for w in windows)
        return (np.sum(parts, axis=0) / max(total, 1)).astype(np.float32)
    return np.asarray(parts[0], dtype=np.float32)
