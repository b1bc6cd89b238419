"""What a request may cost before it is let in: input count, each input's modality, the response's size under the
message limit (from the request alone, then exactly after decoding), and room in the model's queue."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc

from ..config import ServerConfig
from ..errors import ServeError, invalid_argument, unavailable
from ..models.registry import Model
from ..preprocess import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, audio_frames, frame_limit
from .batcher import Batcher
from .chunking import ChunkPlan
from .postprocess import OutputOptions
from .preparation import Prepared, check_modality
from .request import Input, Pcm

_RETRY_S = (0.002, 0.05)  # a waiting caller (a stream) polls for queue room between these bounds
_EMBEDDING_OVERHEAD = 64  # bytes of a response around each embedding's values (shape, dtype, fields), generously


def check_inputs(model: Model, inputs: Sequence[Input], config: ServerConfig) -> None:
    """Some inputs, not more than the limit, each of the model's modality. Raises ServeError."""
    n = len(inputs)
    if n == 0:
        raise invalid_argument("request has no inputs")
    if n > config.max_request_inputs:
        raise invalid_argument(f"request has {n} inputs, the limit is {config.max_request_inputs} "
                               "(split it, or use EmbedStream)")
    for i, inp in enumerate(inputs):
        try:
            check_modality(model, inp)
        except ServeError as exc:
            raise exc.for_input(i) from None


def ready_batcher(model: Model) -> Batcher:
    batcher = model.batcher
    if batcher is None or batcher.state == "warming":
        raise unavailable(f"model {model.name} is warming up")
    return batcher


def check_least_response_size(model: Model, inputs: Sequence[Input], options: OutputOptions, limit_mb: int) -> None:
    """Refuse, before any decoding, an answer over the message limit from what the request alone tells (pooled
    outputs, images, raw PCM)."""
    per_position = model.meta.hidden_size * options.dtype.itemsize
    size = sum(_EMBEDDING_OVERHEAD + per_position * (least_output_positions(model, inp)
                                                     if options.pooling == "none" else 1) for inp in inputs)
    _refuse_over_message_limit(size, limit_mb)


def check_response_size(model: Model, prepared: list[Prepared], options: OutputOptions, plan: ChunkPlan | None,
                        limit_mb: int) -> None:
    """Refuse before the model runs an answer that would exceed the message limit (positions x hidden x dtype;
    a chunked input's stitched positions, and its windows' outputs with the breakdown)."""
    per_position = model.meta.hidden_size * options.dtype.itemsize
    details = plan is not None and plan.details

    def vectors(positions: int) -> int:
        return positions if options.pooling == "none" else 1

    size = 0
    for p in prepared:
        windows = [w.positions for w in p.windows] or [model.output_positions(p.value)]
        whole = p.windows[-1].offset + p.windows[-1].positions if p.windows else windows[0]
        size += _EMBEDDING_OVERHEAD + per_position * vectors(whole)
        if details:
            size += sum(_EMBEDDING_OVERHEAD + per_position * vectors(n) for n in windows)
    _refuse_over_message_limit(size, limit_mb)


def _refuse_over_message_limit(size: int, limit_mb: int) -> None:
    if size > limit_mb * 2**20:
        raise invalid_argument(f"the response would be {size / 2**20:.1f} MiB, over the {limit_mb} MiB message "
                               "limit (--max-message-mb raises it; or send fewer inputs per request, or pool)")


def least_output_positions(model: Model, inp: Input) -> int:
    """The fewest output positions an input can give, from the request alone: an image's fixed count, raw PCM's from
    its length and rate (capped at the audio limit); 0 where only decoding tells (encoded audio, text)."""
    if model.modality == "image":
        return model.image_positions
    pcm = inp.value
    if not isinstance(pcm, Pcm) or not MIN_SAMPLE_RATE <= pcm.sample_rate <= MAX_SAMPLE_RATE:
        return 0
    frame_bytes = {"float32": 4, "int16": 2}.get(pcm.encoding, 0) * max(1, pcm.channels)
    if not frame_bytes:
        return 0
    frames = min(len(pcm.data) // frame_bytes, frame_limit(model.max_audio_seconds, pcm.sample_rate))
    samples = frames * model.sample_rate // pcm.sample_rate - 1  # resampling may round one sample down
    return int(audio_frames(max(0, samples), model.meta.conv_layers))


async def reserve(batcher: Batcher, n: int, wait: bool) -> None:
    """Room for `n` inputs in the model's queue; `wait`: poll until there is room instead of failing with
    RESOURCE_EXHAUSTED."""
    delay = _RETRY_S[0]
    while True:
        try:
            batcher.reserve(n)
            return
        except ServeError as exc:
            if not wait or exc.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
        await asyncio.sleep(delay)
        delay = min(2 * delay, _RETRY_S[1])
