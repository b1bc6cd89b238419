"""The embedding core's request, free of any transport: what a gRPC message or an HTTP JSON body translates into.

Plain frozen dataclasses of Python values (bytes, str, bool), no protobuf: each transport builds them from its own
wire form and the core validates them once. Option values are the lower-case names the HTTP API uses ("mean",
"target", "float16"); a transport passes a value it does not know through as its text (e.g. an unknown proto enum
number, "7") so that the core refuses it with the same message whichever protocol sent it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

INPUT_KINDS = ("audio", "pcm", "image", "text")


@dataclass(frozen=True, slots=True)
class Pcm:
    """Raw samples: interleaved when channels > 1."""

    data: bytes
    encoding: str  # "float32" (little-endian, in [-1, 1]) or "int16" (little-endian); anything else is refused
    sample_rate: int  # required; resampled to the model's rate
    channels: int = 1  # averaged to mono


@dataclass(frozen=True, slots=True)
class Input:
    """One input: `kind` is one of INPUT_KINDS ("" for an empty input, which the core refuses)."""

    kind: str
    value: bytes | str | Pcm | None = None  # audio and image: encoded file bytes; text: str; pcm: Pcm


@dataclass(frozen=True, slots=True)
class Chunking:
    """Long audio and text in overlapping windows (see `chunking.py`); the core checks the values."""

    enabled: bool = False
    window: float = 0.0  # audio seconds, or text tokens incl. <s> and </s>; 0: the model's default
    overlap: float | None = None  # same units; None: the default (audio 1 s, text 64 tokens)
    windows: bool = False  # return the per-window breakdown


@dataclass(frozen=True, slots=True)
class EmbedOptions:
    representation: str = "last"  # last | target
    pooling: str = "mean"  # mean | none | cls
    normalize: bool = False  # L2-normalise each output vector (each position with pooling none)
    dtype: str = "float32"  # float32 | float16
    truncate: bool = False  # cut inputs longer than the model takes instead of failing
    chunking: Chunking = Chunking()
    dimensions: int | None = None  # the vector size the caller expects (OpenAI's `dimensions`): the model's own only


@dataclass(slots=True)
class EmbedRequest:
    inputs: list[Input]
    model: str = ""  # empty: the one model serving the first input's modality
    options: EmbedOptions = field(default_factory=EmbedOptions)
    request_id: str = ""  # echoed in the result
    trace_context: dict[str, str] = field(default_factory=dict)  # the caller's W3C traceparent / tracestate
