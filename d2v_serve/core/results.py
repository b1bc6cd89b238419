"""What a call to the core returns: numpy arrays and plain numbers, one Embedding per input, in input order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class WindowResult:
    """One window of a chunked input (the per-window breakdown)."""

    start: float  # its span of the input: audio seconds; text token positions of the whole input
    end: float
    positions: int  # its own valid output positions
    kept_start: int  # the whole input's positions [kept_start, kept_end) joined from this window
    kept_end: int
    value: np.ndarray  # the window's output alone, under the request's options


@dataclass(slots=True)
class Embedding:
    value: np.ndarray  # [hidden] pooled, or [positions, hidden]; float32 or float16, little-endian, C order
    positions: int  # valid output positions of the input (chunked: of the stitched whole)
    truncated: bool  # the input was cut to fit (only with options.truncate)
    windows: list[WindowResult] | None = None  # with chunking.windows


@dataclass(slots=True)
class Usage:
    inputs: int
    positions: int
    tokens: int = 0  # text
    audio_frames: int = 0
    audio_seconds: float = 0.0
    images: int = 0


@dataclass(slots=True)
class Timings:
    """Wall-clock spans of one call on the server, in milliseconds."""

    preprocess_ms: float
    queue_ms: float  # longest wait of an input between admission and the start of its batch
    inference_ms: float  # longest model run among the batches that carried the call's inputs
    total_ms: float


# Per-call timings as HTTP response headers and gRPC trailing metadata: milliseconds, and the output positions
# (tokens, audio frames, patches) computed for the call's inputs, padding excluded.
TIMING_HEADERS = {"total": "x-d2v-total-ms", "preprocess": "x-d2v-preprocess-ms", "queue": "x-d2v-queue-ms",
                  "inference": "x-d2v-inference-ms", "positions": "x-d2v-positions"}


@dataclass(slots=True)
class EmbedResult:
    model: str
    embeddings: list[Embedding]  # one per input, in input order
    usage: Usage
    timings: Timings
    request_id: str
    dtype: str = "float32"  # the values' dtype name (core.postprocess.DTYPES): int8 and binary share numpy's int8

    def timing_headers(self) -> list[tuple[str, str]]:
        """The call's timings under TIMING_HEADERS' names, as both transports send them."""
        ms = {"total": self.timings.total_ms, "preprocess": self.timings.preprocess_ms,
              "queue": self.timings.queue_ms, "inference": self.timings.inference_ms}
        return [(TIMING_HEADERS[k], f"{v:.3f}") for k, v in ms.items()] + \
            [(TIMING_HEADERS["positions"], str(self.usage.positions))]
