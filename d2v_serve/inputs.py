"""Request inputs -> prepared model inputs, driven only by the model's metadata (runs on the preprocessing pool)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import ServeError, failed_precondition, invalid_argument
from .preprocess import InputTooLong, PreprocessError, decode_audio, decode_image, pcm_to_waveform
from .registry import Model
from .request import Input, Pcm

KIND_MODALITY = {"audio": "audio", "pcm": "audio", "image": "image", "text": "text"}
_PCM_DTYPES = ("float32", "int16")


@dataclass
class Prepared:
    value: np.ndarray
    truncated: bool = False
    audio_seconds: float = 0.0


def input_modality(inp: Input) -> str:
    if inp.kind not in KIND_MODALITY:
        raise invalid_argument("empty input (set one of audio, pcm, image, text)")
    return KIND_MODALITY[inp.kind]


def check_modality(model: Model, inp: Input) -> None:
    modality = input_modality(inp)
    if modality != model.modality:
        raise failed_precondition(f"model {model.name} takes {model.modality}, got {modality}")


def prepare(model: Model, inp: Input, truncate: bool) -> Prepared:
    """Decode and preprocess one input as the model file says. Raises ServeError (INVALID_ARGUMENT)."""
    kind = inp.kind
    try:
        if kind == "text":
            return _text(model, inp.value, truncate)
        if kind == "image":
            return Prepared(model.preprocessing.prepare(decode_image(_image_bytes(inp.value))))
        if kind == "audio":
            waveform, rate = decode_audio(inp.value)
        else:
            waveform, rate = _pcm(inp.value)
        return _audio(model, waveform, rate, truncate)
    except InputTooLong as exc:
        raise invalid_argument(f"{exc} (set options.truncate to cut it)") from None
    except PreprocessError as exc:
        raise invalid_argument(str(exc)) from None


def _text(model: Model, text: str, truncate: bool) -> Prepared:
    result = prepare_texts(model, [text], truncate)[0]
    if isinstance(result, ServeError):
        raise result
    return result


def prepare_texts(model: Model, texts: Sequence[str], truncate: bool) -> list[Prepared | ServeError]:
    """Tokenize a request's texts in one call; each input gets its Prepared, or its ServeError (INVALID_ARGUMENT)."""
    out: list[Prepared | ServeError] = []
    for result in model.preprocessing.prepare_batch(texts, truncate, max_length=model.max_tokens):
        if isinstance(result, InputTooLong):
            out.append(invalid_argument(f"{result} (set options.truncate to cut it)"))
        elif isinstance(result, PreprocessError):
            out.append(invalid_argument(str(result)))
        else:
            out.append(Prepared(result[0], truncated=result[1]))
    return out


def _pcm(pcm: Pcm) -> tuple[np.ndarray, int]:
    if pcm.encoding not in _PCM_DTYPES:
        raise PreprocessError("pcm encoding must be float32 (ENCODING_FLOAT32) or int16 (ENCODING_INT16)")
    if pcm.sample_rate <= 0:
        raise PreprocessError("pcm sample_rate is required")
    return pcm_to_waveform(pcm.data, pcm.encoding, channels=pcm.channels or 1), int(pcm.sample_rate)


def _audio(model: Model, waveform: np.ndarray, rate: int, truncate: bool) -> Prepared:
    limit = int(model.max_samples * rate / model.sample_rate)  # the limit at the input's own rate
    truncated = len(waveform) > limit
    if truncated:
        if not truncate:
            raise InputTooLong(f"audio is {len(waveform) / rate:.1f} s, the server takes at most "
                               f"{model.max_samples / model.sample_rate:.1f} s")
        waveform = waveform[:limit]
    value = model.preprocessing.prepare(waveform, rate)
    if len(value) < model.min_samples:
        raise PreprocessError(f"audio is {len(value)} samples at {model.sample_rate} Hz, model {model.name} needs "
                              f"at least {model.min_samples} ({1000 * model.min_samples / model.sample_rate:.0f} ms)")
    return Prepared(value, truncated=truncated, audio_seconds=len(value) / model.sample_rate)


def _image_bytes(data: bytes) -> bytes:
    """Image bytes, or the payload of a `data:image/...;base64,` URI."""
    if not data[:5].lower() == b"data:":
        return data
    header, sep, payload = data.partition(b",")
    if not sep or not header.lower().endswith(b";base64"):
        raise PreprocessError("data URI must be data:<type>;base64,<payload>")
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise PreprocessError(f"data URI payload is not base64: {exc}") from None
