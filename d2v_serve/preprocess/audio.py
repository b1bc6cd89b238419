"""Audio: decode (any libsndfile format), mix to mono, resample with soxr, normalise like Wav2Vec2FeatureExtractor."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import soundfile as sf
import soxr

from .errors import PreprocessError, check_config_keys, one_line

NORM_EPS = 1e-7  # Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm
_PCM_DTYPES = {"float32": np.dtype("<f4"), "int16": np.dtype("<i2")}


@dataclass
class AudioPreprocessing:
    sample_rate: int = 16000
    normalize: bool = True

    def __post_init__(self) -> None:
        if int(self.sample_rate) != self.sample_rate or self.sample_rate <= 0:
            raise ValueError(f"audio sample_rate must be a positive integer, got {self.sample_rate!r}")
        self.sample_rate = int(self.sample_rate)
        self.normalize = bool(self.normalize)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AudioPreprocessing:
        check_config_keys("audio", d, cls.__dataclass_fields__)
        return cls(**d)

    def prepare(self, waveform: np.ndarray, sample_rate: int) -> np.ndarray:
        """Mono waveform at any rate -> float32 1-D at `self.sample_rate`, normalised if `self.normalize`."""
        x = np.asarray(waveform)
        if x.ndim != 1:
            raise PreprocessError(f"expected a 1-D mono waveform, got shape {x.shape}")
        if x.size == 0:
            raise PreprocessError("audio is empty")
        if int(sample_rate) != sample_rate or sample_rate <= 0:
            raise PreprocessError(f"sample rate must be a positive integer, got {sample_rate!r}")
        x = x.astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            raise PreprocessError("audio contains NaN or infinite samples")
        if int(sample_rate) != self.sample_rate:
            x = soxr.resample(x, int(sample_rate), self.sample_rate, quality="HQ").astype(np.float32, copy=False)
            if x.size == 0:
                raise PreprocessError(f"audio too short to resample from {sample_rate} Hz to {self.sample_rate} Hz")
        if self.normalize:
            x = normalize_waveform(x)
        return np.ascontiguousarray(x, dtype=np.float32)


def normalize_waveform(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance over the given (unpadded) samples: (x - mean) / sqrt(var + 1e-7)."""
    x64 = np.asarray(x, dtype=np.float64)
    return ((x64 - x64.mean()) / np.sqrt(x64.var() + NORM_EPS)).astype(np.float32)


def decode_audio(data: bytes | str | Path) -> tuple[np.ndarray, int]:
    """Encoded audio (bytes or a file path; wav, flac, ogg, ... anything libsndfile reads) -> (float32 mono, rate).

    Channels are averaged. Raises PreprocessError with a one-line reason when the input is undecodable or empty.
    """
    source: Any = io.BytesIO(data) if isinstance(data, bytes | bytearray | memoryview) else Path(data)
    if isinstance(source, io.BytesIO) and not source.getbuffer().nbytes:
        raise PreprocessError("audio is empty (0 bytes)")
    try:
        samples, rate = sf.read(source, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError) as exc:
        # libsndfile's own reason, without soundfile's "Error opening <BytesIO at 0x...>" prefix
        reason = exc.error_string if isinstance(exc, sf.LibsndfileError) else one_line(exc)
        raise PreprocessError(f"cannot decode audio: {one_line(reason)}") from None
    if samples.shape[0] == 0:
        raise PreprocessError("audio has no samples")
    mono = samples[:, 0] if samples.shape[1] == 1 else samples.mean(axis=1, dtype=np.float32)
    return np.ascontiguousarray(mono, dtype=np.float32), int(rate)


def pcm_to_waveform(raw: bytes, dtype: Literal["float32", "int16"] = "float32", channels: int = 1) -> np.ndarray:
    """Raw little-endian interleaved PCM -> float32 mono in [-1, 1) (int16 is scaled by 1/32768; channels averaged)."""
    if dtype not in _PCM_DTYPES:
        raise PreprocessError(f"unsupported PCM dtype {dtype!r} (use float32 or int16)")
    if channels < 1:
        raise PreprocessError(f"channels must be >= 1, got {channels}")
    np_dtype = _PCM_DTYPES[dtype]
    frame_bytes = np_dtype.itemsize * channels
    if len(raw) == 0:
        raise PreprocessError("audio is empty (0 bytes)")
    if len(raw) % frame_bytes:
        raise PreprocessError(f"PCM length {len(raw)} bytes is not a multiple of {frame_bytes} ({dtype}, {channels}ch)")
    x = np.frombuffer(raw, dtype=np_dtype).reshape(-1, channels)
    x = x.astype(np.float32) / 32768.0 if dtype == "int16" else x.astype(np.float32)
    mono = x[:, 0] if channels == 1 else x.mean(axis=1, dtype=np.float32)
    return np.ascontiguousarray(mono)


def audio_frames(num_samples: int | np.ndarray, conv_layers: Sequence[Sequence[int]]) -> int | np.ndarray:
    """Output frames of the conv feature encoder: fold of floor((n - kernel) / stride) + 1, never below 0."""
    n = np.asarray(num_samples, dtype=np.int64)
    for _dim, kernel, stride in conv_layers:
        n = np.maximum((n - kernel) // stride + 1, 0)
    return int(n) if n.ndim == 0 else n


def min_audio_samples(conv_layers: Sequence[Sequence[int]]) -> int:
    """The shortest input that gives one output frame: the conv feature encoder's receptive field."""
    samples = 1
    for _dim, kernel, stride in reversed(conv_layers):
        samples = (samples - 1) * stride + kernel
    return samples

