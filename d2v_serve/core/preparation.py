"""Request inputs -> prepared model inputs, driven only by the model's metadata (runs on the preprocessing pool)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import ServeError, failed_precondition, invalid_argument
from ..media import is_data_uri, parse_data_uri
from ..models.registry import Model
from ..preprocess import (
    InputTooLarge,
    InputTooLong,
    PreprocessError,
    clip_text,
    decode_audio,
    decode_image,
    frame_limit,
    normalize_waveform,
    pcm_to_waveform,
)
from .chunking import ChunkPlan, Window, audio_windows, text_windows
from .request import Chunking, Input, Pcm

KIND_MODALITY = {"audio": "audio", "pcm": "audio", "image": "image", "text": "text"}
_PCM_DTYPES = ("float32", "int16")


@dataclass
class Prepared:
    value: np.ndarray  # the model input; a chunked input's first window
    truncated: bool = False
    audio_seconds: float = 0.0
    windows: list[Window] = field(default_factory=list)  # chunked into more than one window: their plan
    window_values: list[np.ndarray] = field(default_factory=list)  # ... and their model inputs

    @property
    def values(self) -> list[np.ndarray]:
        """The batch items this input runs as: its windows, or itself."""
        return self.window_values or [self.value]


def chunk_plan(model: Model, chunking: Chunking) -> ChunkPlan | None:
    """A request's chunking options in model units (None when off); raises ServeError for values the model cannot
    take."""
    if not chunking.enabled:
        return None
    if model.chunk is None:
        raise failed_precondition(f"model {model.name} takes {model.modality}: chunking applies to audio and text")
    window = chunking.window or model.chunk.window
    overlap = model.chunk.overlap if chunking.overlap is None else chunking.overlap
    if not (np.isfinite(window) and np.isfinite(overlap)) or window < 0 or overlap < 0:
        raise invalid_argument(f"chunking window and overlap must be >= 0, got {chunking.window} and "
                               f"{chunking.overlap}")
    if model.modality == "audio":
        rate, limit = model.sample_rate, model.max_audio_seconds
        if window > limit:
            raise invalid_argument(f"chunking window {window:g} s is over the server's --max-audio-seconds "
                                   f"({limit:g} s)")
        shortest = model.meta.receptive_field / rate
        if window < shortest:
            raise invalid_argument(f"chunking window {window:g} s is shorter than one frame ({shortest:g} s)")
        if overlap >= window:
            raise invalid_argument(f"chunking overlap {overlap:g} s must be shorter than the window ({window:g} s)")
        return ChunkPlan(int(window * rate), int(overlap * rate), max_seconds=model.chunk.max_seconds,
                         details=chunking.windows)
    if window != int(window) or overlap != int(overlap):
        raise invalid_argument(f"text chunking window and overlap are whole tokens, got {window:g} and {overlap:g}")
    if window > model.max_tokens:
        raise invalid_argument(f"chunking window {window:g} tokens is over the model's {model.max_tokens}")
    if window - 2 - overlap < 1:
        raise invalid_argument(f"chunking window {window:g} tokens leaves no room past the overlap of {overlap:g} "
                               "and <s>, </s>")
    return ChunkPlan(int(window), int(overlap), max_chars=model.chunk.max_chars, max_length=model.chunk.max_tokens,
                     details=chunking.windows)


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


def prepare(model: Model, inp: Input, truncate: bool, plan: ChunkPlan | None = None) -> Prepared:
    """Decode and preprocess one input as the model file says, in windows with a chunk plan. Raises ServeError
    (INVALID_ARGUMENT)."""
    kind = inp.kind
    max_seconds = model.max_audio_seconds if plan is None else plan.max_seconds
    try:
        if kind == "text":
            return _text(model, inp.value, truncate, plan)
        if kind == "image":
            image = decode_image(_image_bytes(inp.value), model.max_image_pixels)
            return Prepared(model.preprocessing.prepare(image))
        if kind == "audio":
            waveform, rate = decode_audio(inp.value, max_seconds, truncate)
        else:
            waveform, rate = _pcm(inp.value, max_seconds, truncate)
        if plan is not None:
            return _audio_windows(model, waveform, rate, truncate, plan)
        return _audio(model, waveform, rate, truncate)
    except PreprocessError as exc:
        raise refusal(_chunked_limit(exc) if plan is not None else exc) from None


_CHUNKED_LIMITS = {"max_audio_seconds": "max_chunked_audio_seconds", "": "max_chunked_tokens"}


def _chunked_limit(exc: PreprocessError) -> PreprocessError:
    """A length refusal of a chunked input names the chunked limit's flag."""
    if isinstance(exc, InputTooLarge) and exc.limit in _CHUNKED_LIMITS:
        exc.limit = _CHUNKED_LIMITS[exc.limit]
    return exc


def refusal(exc: PreprocessError) -> ServeError:
    """INVALID_ARGUMENT with the reason and, for a limit, what the client or the operator can do about it: the
    server flag that raises the limit, and truncation where it applies."""
    remedies = [f"--{exc.limit.replace('_', '-')} raises it"] if isinstance(exc, InputTooLarge) and exc.limit else []
    if isinstance(exc, InputTooLong):
        remedies.append("set options.truncate to cut it")
    return invalid_argument(f"{exc} ({'; '.join(remedies)})" if remedies else str(exc))


def _text(model: Model, text: str, truncate: bool, plan: ChunkPlan | None = None) -> Prepared:
    result = prepare_texts(model, [text], truncate, plan)[0]
    if isinstance(result, ServeError):
        raise result
    return result


def prepare_texts(model: Model, texts: Sequence[str], truncate: bool, plan: ChunkPlan | None = None
                  ) -> list[Prepared | ServeError]:
    """Check each text's length in characters (before any tokenizing: --max-text-chars), then tokenize the rest in
    one call; each input gets its Prepared (in windows with a chunk plan), or its ServeError (INVALID_ARGUMENT)."""
    out: list[Prepared | ServeError | None] = [None] * len(texts)
    max_chars, max_tokens = (model.max_text_chars, model.max_tokens) if plan is None else (plan.max_chars,
                                                                                             plan.max_length)
    todo, clipped, cut = [], [], []
    for i, text in enumerate(texts):
        try:
            value, was_cut = clip_text(text, max_chars, truncate)
        except PreprocessError as exc:
            out[i] = refusal(exc)
            continue
        todo.append(i)
        clipped.append(value)
        cut.append(was_cut)
    results = model.preprocessing.prepare_batch(clipped, truncate, max_length=max_tokens)
    for i, was_cut, result in zip(todo, cut, results, strict=True):
        if isinstance(result, PreprocessError):
            out[i] = refusal(_chunked_limit(result) if plan is not None else result)
        elif plan is None or len(result[0]) <= plan.window:
            out[i] = Prepared(result[0], result[1] or was_cut)
        else:
            out[i] = _text_windows(model, result[0], result[1] or was_cut, plan)
    return out  # type: ignore[return-value] - every slot is filled


def _text_windows(model: Model, ids: np.ndarray, truncated: bool, plan: ChunkPlan) -> Prepared:
    """<s> + a window's tokens + </s> for each window over the tokens between the input's own <s> and </s>."""
    pre = model.preprocessing
    tokens = ids[1:-1]  # prepare_batch gives <s> ... </s>
    windows = text_windows(len(tokens), plan.window, plan.overlap)
    bos, eos = np.array([pre.bos_id], np.int64), np.array([pre.eos_id], np.int64)
    values = [np.concatenate([bos, tokens[w.start: w.end], eos]) for w in windows]
    return Prepared(values[0], truncated, windows=windows, window_values=values)


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


def _audio_windows(model: Model, waveform: np.ndarray, rate: int, truncate: bool, plan: ChunkPlan) -> Prepared:
    """Resample the whole input, cut it into windows, and normalise each window on its own (as training normalised
    each crop). An input no longer than the window is prepared exactly as without chunking."""
    limit = frame_limit(plan.max_seconds, rate)
    truncated = len(waveform) > limit
    if truncated:
        if not truncate:
            raise InputTooLong(f"audio is longer than its header says and than the limit of {plan.max_seconds:g} s",
                               "max_audio_seconds")
        waveform = waveform[:limit]
    if len(waveform) * model.sample_rate <= plan.window * rate:
        return dataclasses.replace(_audio(model, waveform, rate, truncate=False), truncated=truncated)
    pre = model.preprocessing
    samples = dataclasses.replace(pre, normalize=False).prepare(waveform, rate)
    windows = audio_windows(len(samples), plan.window, plan.overlap, model.meta.conv_layers)
    values = [samples[w.start: w.end] for w in windows]
    if pre.normalize:
        values = [normalize_waveform(v) for v in values]
    values = [np.ascontiguousarray(v, dtype=np.float32) for v in values]
    seconds = len(samples) / model.sample_rate
    if len(windows) == 1:
        return Prepared(values[0], truncated, seconds)
    return Prepared(values[0], truncated, seconds, windows, values)


def _image_bytes(data: bytes) -> bytes:
    """Image bytes, or the payload of a `data:image/...;base64,` URI."""
    if not is_data_uri(data):
        return data
    try:
        return parse_data_uri(data)[1]
    except ValueError as exc:
        raise PreprocessError(str(exc)) from None
