"""Request inputs -> prepared model inputs, driven only by the model's metadata (runs on the preprocessing pool)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import ServeError, failed_precondition, invalid_argument
from .preprocess import (
    InputTooLarge,
    InputTooLong,
    PreprocessError,
    clip_text,
    decode_audio,
    decode_image,
    frame_limit,
    pcm_to_waveform,
)
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


def input_bytes(inp: Input) -> int:
    """The size of an input as received: encoded bytes, PCM bytes, or text characters."""
    value = inp.value
    if isinstance(value, Pcm):
        return len(value.data)
    return len(value) if isinstance(value, bytes | str) else 0


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
            image = decode_image(_image_bytes(inp.value), model.max_image_pixels)
            return Prepared(model.preprocessing.prepare(image))
        if kind == "audio":
            waveform, rate = decode_audio(inp.value, model.max_audio_seconds, truncate)
        else:
            waveform, rate = _pcm(inp.value, model.max_audio_seconds, truncate)
        return _audio(model, waveform, rate, truncate)
    except PreprocessError as exc:
        raise refusal(exc) from None


def refusal(exc: PreprocessError) -> ServeError:
    """INVALID_ARGUMENT with the reason and, for a limit, what the client or the operator can do about it: the
    server flag that raises the limit, and truncation where it applies."""
    remedies = [f"--{exc.limit.replace('_', '-')} raises it"] if isinstance(exc, InputTooLarge) and exc.limit else []
    if isinstance(exc, InputTooLong):
        remedies.append("set options.truncate to cut it")
    return invalid_argument(f"{exc} ({'; '.join(remedies)})" if remedies else str(exc))


def _text(model: Model, text: str, truncate: bool) -> Prepared:
    result = prepare_texts(model, [text], truncate)[0]
    if isinstance(result, ServeError):
        raise result
    return result


def prepare_texts(model: Model, texts: Sequence[str], truncate: bool) -> list[Prepared | ServeError]:
    """Check each text's length in characters (before any tokenizing: --max-text-chars), then tokenize the rest in
    one call; each input gets its Prepared, or its ServeError (INVALID_ARGUMENT)."""
    out: list[Prepared | ServeError | None] = [None] * len(texts)
    todo, clipped, cut = [], [], []
    for i, text in enumerate(texts):
        try:
            value, was_cut = clip_text(text, model.max_text_chars, truncate)
        except PreprocessError as exc:
            out[i] = refusal(exc)
            continue
        todo.append(i)
        clipped.append(value)
        cut.append(was_cut)
    results = model.preprocessing.prepare_batch(clipped, truncate, max_length=model.max_tokens)
    for i, was_cut, result in zip(todo, cut, results, strict=True):
        out[i] = refusal(result) if isinstance(result, PreprocessError) else Prepared(result[0], result[1] or was_cut)
    return out  # type: ignore[return-value] - every slot is filled


def _pcm(pcm: Pcm, max_seconds: float, truncate: bool) -> tuple[np.ndarray, int]:
    if pcm.encoding not in _PCM_DTYPES:
        raise PreprocessError("pcm encoding must be float32 (ENCODING_FLOAT32) or int16 (ENCODING_INT16)")
    if pcm.sample_rate <= 0:
        raise PreprocessError("pcm sample_rate is required")
    waveform = pcm_to_waveform(pcm.data, pcm.encoding, channels=pcm.channels or 1, sample_rate=pcm.sample_rate,
                               max_seconds=max_seconds, truncate=truncate)
    return waveform, int(pcm.sample_rate)


def _audio(model: Model, waveform: np.ndarray, rate: int, truncate: bool) -> Prepared:
    """Cut to the limit (the decoders hold at most one frame more, also when a header under-states the length)."""
    limit = frame_limit(model.max_audio_seconds, rate)
    truncated = len(waveform) > limit
    if truncated:
        if not truncate:
            raise InputTooLong(f"audio is longer than its header says and than the limit of "
                               f"{model.max_audio_seconds:g} s", "max_audio_seconds")
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
