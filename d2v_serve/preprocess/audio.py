"""Audio: decode (any libsndfile format), mix to mono, resample with soxr, normalise like Wav2Vec2FeatureExtractor."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import soundfile as sf
import soxr

from .errors import InputTooLong, PreprocessError, check_config_keys, one_line

NORM_EPS = 1e-7  # Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm
# Input sample rates accepted (encoded audio and raw PCM alike): below 1 kHz a few bytes resample into minutes of
# model input; above 384 kHz (the highest common studio rate) there is no real audio, only a cost.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1_000, 384_000
MAX_CHANNELS = 64  # third-order ambisonics is 16; more is an attack on the mixing step
_BLOCK_SAMPLES = 1 << 20  # samples (all channels together) decoded per read: 4 MiB of float32
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
    """Zero mean, unit variance over the given (unpadded) samples: (x - mean) / sqrt(var + 1e-7), the statistics
    in float64, the result written once, in float32."""
    x = np.asarray(x, dtype=np.float32)
    mean, var = x.mean(dtype=np.float64), x.var(dtype=np.float64)
    out = np.subtract(x, np.float32(mean), dtype=np.float32)
    out *= np.float32(1.0 / np.sqrt(var + NORM_EPS))
    return out


def check_sample_rate(rate: int) -> int:
    """The rate as an int when it lies in [MIN_SAMPLE_RATE, MAX_SAMPLE_RATE] Hz, else PreprocessError."""
    if int(rate) != rate or not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise PreprocessError(f"sample rate {rate} Hz is outside {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz")
    return int(rate)


def _check_channels(channels: int) -> None:
    if not 1 <= channels <= MAX_CHANNELS:
        raise PreprocessError(f"audio has {channels} channels, expected 1 to {MAX_CHANNELS}")


def frame_limit(max_seconds: float, rate: int) -> int:
    """The most frames of `max_seconds` at `rate`: the one rounding decode_audio, pcm_to_waveform and servers use."""
    return int(max_seconds * rate)


def _too_long(seconds: float, max_seconds: float, how: str = "") -> InputTooLong:
    return InputTooLong(f"audio is {seconds:.1f} s{how}, the limit is {max_seconds:g} s", "max_audio_seconds")


def decode_audio(data: bytes | str | Path, max_seconds: float | None = None,
                 truncate: bool = False) -> tuple[np.ndarray, int]:
    """Encoded audio (bytes or a file path; wav, flac, ogg, ... anything libsndfile reads) -> (float32 mono, rate).

    Channels are averaged. With `max_seconds` the cost is known before it is paid: a header claiming more is refused
    (InputTooLong) before anything is decoded, or with `truncate` only the start is decoded; either way at most
    max_seconds plus one frame is ever held (the extra frame tells the caller the input was longer), whatever the
    header claims. The rate must lie in MIN_SAMPLE_RATE..MAX_SAMPLE_RATE. Raises PreprocessError with a one-line
    reason when the input is undecodable, empty or over a limit.
    """
    source: Any = io.BytesIO(data) if isinstance(data, bytes | bytearray | memoryview) else Path(data)
    if isinstance(source, io.BytesIO) and not source.getbuffer().nbytes:
        raise PreprocessError("audio is empty (0 bytes)")
    try:
        with sf.SoundFile(source) as f:
            rate = check_sample_rate(f.samplerate)
            _check_channels(f.channels)
            max_frames = None
            if max_seconds is not None:
                max_frames = frame_limit(max_seconds, rate) + 1
                if f.frames >= max_frames and not truncate:
                    raise _too_long(f.frames / rate, max_seconds, " by its header")
            mono = _read_mono(f, max_frames)
    except PreprocessError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError, MemoryError) as exc:
        # libsndfile's own reason, without soundfile's "Error opening <BytesIO at 0x...>" prefix
        reason = exc.error_string if isinstance(exc, sf.LibsndfileError) else one_line(exc)
        raise PreprocessError(f"cannot decode audio: {one_line(reason)}") from None
    if mono.size == 0:
        raise PreprocessError("audio has no samples")
    return mono, rate


def _read_mono(f: sf.SoundFile, max_frames: int | None) -> np.ndarray:
    """Decode block by block, mixing each block to mono: memory follows what the stream holds (up to max_frames),
    never the frame count its header claims."""
    block = max(1, _BLOCK_SAMPLES // f.channels)
    parts: list[np.ndarray] = []
    total = 0
    while max_frames is None or total < max_frames:
        chunk = f.read(block if max_frames is None else min(block, max_frames - total), dtype="float32",
                       always_2d=True)
        if not len(chunk):
            break
        parts.append(chunk[:, 0].copy() if f.channels == 1 else chunk.mean(axis=1, dtype=np.float32))
        total += len(chunk)
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def pcm_to_waveform(raw: bytes, dtype: Literal["float32", "int16"] = "float32", channels: int = 1,
                    sample_rate: int | None = None, max_seconds: float | None = None,
                    truncate: bool = False) -> np.ndarray:
    """Raw little-endian interleaved PCM -> float32 mono in [-1, 1) (int16 is scaled by 1/32768; channels averaged).

    With `sample_rate` and `max_seconds`: longer input is refused (InputTooLong) before any conversion, or with
    `truncate` only max_seconds plus one frame is converted (as decode_audio does).
    """
    if dtype not in _PCM_DTYPES:
        raise PreprocessError(f"unsupported PCM dtype {dtype!r} (use float32 or int16)")
    _check_channels(channels)
    np_dtype = _PCM_DTYPES[dtype]
    frame_bytes = np_dtype.itemsize * channels
    if len(raw) == 0:
        raise PreprocessError("audio is empty (0 bytes)")
    if len(raw) % frame_bytes:
        raise PreprocessError(f"PCM length {len(raw)} bytes is not a multiple of {frame_bytes} ({dtype}, {channels}ch)")
    frames = len(raw) // frame_bytes
    if sample_rate is not None:
        rate = check_sample_rate(sample_rate)
        if max_seconds is not None and frames > frame_limit(max_seconds, rate):
            if not truncate:
                raise _too_long(frames / rate, max_seconds)
            frames = frame_limit(max_seconds, rate) + 1
    # a read-only view of the request's bytes, copied once below
    x = np.frombuffer(raw, dtype=np_dtype, count=frames * channels)
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    if dtype == "int16":
        return np.multiply(x, np.float32(1 / 32768), dtype=np.float32)
    return x.astype(np.float32, copy=False)


def audio_frames(num_samples: int | np.ndarray, conv_layers: Sequence[Sequence[int]]) -> int | np.ndarray:
    """Output frames of the conv feature encoder: fold of floor((n - kernel) / stride) + 1, never below 0."""
    n = np.asarray(num_samples, dtype=np.int64)
    for _dim, kernel, stride in conv_layers:
        n = np.maximum((n - kernel) // stride + 1, 0)
    return int(n) if n.ndim == 0 else n


def conv_stride(conv_layers: Sequence[Sequence[int]]) -> int:
    """Samples per output frame of the conv feature encoder: the product of its strides."""
    return math.prod(int(stride) for _dim, _kernel, stride in conv_layers)


def min_audio_samples(conv_layers: Sequence[Sequence[int]]) -> int:
    """The shortest input that gives one output frame: the conv feature encoder's receptive field."""
    samples = 1
    for _dim, kernel, stride in reversed(conv_layers):
        samples = (samples - 1) * stride + kernel
    return samples

