"""The transport-free embedding core: model lookup, limits, preprocessing on the pool, batching, per-item results.

Each transport (the gRPC servicer in `service.py`, the HTTP routes) translates its wire request into a
`request.EmbedRequest`, calls `EmbeddingCore.embed`, and packs the `EmbedResult` (numpy arrays and plain numbers)
into its own response. A failure is one `ServeError(code, message, input_index)`; the codes are the canonical gRPC
status codes, which each transport maps to its own statuses. The core also owns the drain: once `begin_drain` is
called every transport's new calls fail with UNAVAILABLE while the admitted ones finish (`wait_idle`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import grpc
import numpy as np

from .. import metrics
from ..config import ServerConfig
from ..errors import ServeError, internal, invalid_argument, not_found, shutting_down, unavailable
from ..models.registry import REPRESENTATIONS, Model
from ..preprocess import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, audio_frames, frame_limit
from .batcher import Batcher, Item, ItemResult
from .chunking import ChunkPlan, WindowPart, join
from .memory import release_free_memory
from .postprocess import OutputOptions, output_options
from .preparation import Prepared, check_modality, chunk_plan, input_bytes, input_modality, prepare, prepare_texts
from .relay import Relay
from .request import EmbedOptions, EmbedRequest, Input, Pcm

log = logging.getLogger(__name__)

_RETRY_S = (0.002, 0.05)  # a waiting caller (a stream) polls for queue room between these bounds
_EMBEDDING_OVERHEAD = 64  # bytes of a response around each embedding's values (shape, dtype, fields), generously
_TRIM_AFTER_BYTES = 64 * 2**20  # idle again after preprocessing this much: hand freed heap back to the OS
_TOKENIZE_INLINE_CHARS = 1024  # texts up to this many characters in all are tokenized on the event loop


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


@dataclass(slots=True)
class EmbedResult:
    model: str
    embeddings: list[Embedding]  # one per input, in input order
    usage: Usage
    timings: Timings
    request_id: str


@dataclass(slots=True)
class ModelInfo:
    name: str
    modality: str  # audio | image | text
    hidden_size: int
    num_layers: int
    precision: str  # fp32 | fp16 | int8
    representations: list[str]  # of REPRESENTATIONS' keys: last, target
    execution_provider: str
    ready: bool
    file: str
    metadata_json: str  # the model file's d2v metadata without the tokenizer text
    max_tokens: int = 0  # text
    max_audio_seconds: float = 0.0  # audio
    sample_rate: int = 0  # audio
    image_size: int = 0  # image
    chunk_window: float = 0.0  # chunking defaults: audio seconds, text tokens
    chunk_overlap: float = 0.0
    max_chunked_audio_seconds: float = 0.0
    max_chunked_tokens: int = 0


class ByteBudget:
    """Bytes of encoded input being preprocessed at once. A request larger than the whole budget waits until the
    budget is free and then runs alone, so any request the message limit lets in can still be served."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.waiting = 0
        self._changed = asyncio.Condition()
        metrics.gauge_from(metrics.PREPROCESS_BYTES, self, lambda b: b.used)

    def hold(self, n: int) -> _Held:
        """`async with budget.hold(n):` holds min(n, limit) bytes of the budget."""
        return _Held(self, min(n, self.limit))


class _Held:
    """A hold on a ByteBudget. Taking what is free costs no lock (one event loop thread runs all of this); only a
    request that has to wait, and a release while some do, go through the condition."""

    __slots__ = ("budget", "n")

    def __init__(self, budget: ByteBudget, n: int) -> None:
        self.budget, self.n = budget, n

    async def __aenter__(self) -> None:
        b, n = self.budget, self.n
        if b.used + n > b.limit:
            b.waiting += 1
            try:
                async with b._changed:
                    await b._changed.wait_for(lambda: b.used + n <= b.limit)
            finally:
                b.waiting -= 1
        b.used += n

    async def __aexit__(self, *exc: object) -> None:
        b = self.budget
        b.used -= self.n
        if b.waiting:
            async with b._changed:
                b._changed.notify_all()


class EmbeddingCore:
    def __init__(self, models: dict[str, Model], pool: Executor, config: ServerConfig) -> None:
        self.models = models
        self.pool = pool
        self.config = config
        self.draining = False
        self.cutting = False  # the drain's grace is over: calls still in flight are being cancelled
        self._inflight = 0
        self._tasks: set[asyncio.Task] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._budget = ByteBudget(config.max_preprocess_mb * 2**20)
        self._relay = Relay()
        self._options: dict[tuple, OutputOptions] = {}  # valid option sets per model: a few dozen at most
        self._bytes_since_trim = 0
        self.last_call_at = 0.0  # time.monotonic() of the latest call's arrival
        metrics.gauge_from(metrics.INFLIGHT, self, lambda core: core._inflight)

    # ---- lifecycle ------------------------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Refuse new work with UNAVAILABLE; calls already admitted finish."""
        self.draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is in flight; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except (TimeoutError, asyncio.TimeoutError):  # distinct classes before Python 3.11
            return False

    async def wait_quiet(self, quiet_s: float, timeout: float) -> None:
        """Wait until no call has arrived for `quiet_s` (at most `timeout`): while draining, calls racing the
        shutdown still get their UNAVAILABLE from us instead of a CANCELLED from the closing transport."""
        end = time.monotonic() + timeout
        while (now := time.monotonic()) < end and now - self.last_call_at < quiet_s:
            await asyncio.sleep(min(quiet_s, end - now) / 4)

    def cut(self) -> int:
        """The grace is over: cancel the calls still in flight. A transport that sees `cutting` when its call is
        cancelled answers `shutting_down()` (UNAVAILABLE) instead of a bare cancellation. Returns how many."""
        self.cutting = True
        for task in self._tasks:
            task.cancel()
        return len(self._tasks)

    @contextlib.contextmanager
    def tracked(self) -> Iterator[None]:
        """Count a transport call as in flight (the drain waits for it, `cut` cancels it)."""
        self.last_call_at = time.monotonic()
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._inflight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._tasks.discard(task)
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()
                self._release_memory_if_due()

    def _release_memory_if_due(self) -> None:
        """After a burst of large inputs, idle again: give freed heap pages back (glibc keeps them otherwise)."""
        if self._bytes_since_trim >= _TRIM_AFTER_BYTES:
            self._bytes_since_trim = 0
            with contextlib.suppress(RuntimeError):  # the pool is already shut down: the server is stopping
                self.pool.submit(release_free_memory)

    # ---- models ---------------------------------------------------------------------------------------------

    def named_model(self, name: str) -> Model:
        if name not in self.models:
            raise not_found(f"unknown model {name!r} (models: {', '.join(self.models)})")
        return self.models[name]

    def model_for(self, request: EmbedRequest) -> Model:
        """The named model, or the one model serving the first input's modality."""
        if request.model:
            return self.named_model(request.model)
        if not request.inputs:
            raise invalid_argument("request has no inputs")
        try:
            modality = input_modality(request.inputs[0])
        except ServeError as exc:
            raise exc.for_input(0) from None
        candidates = [m.name for m in self.models.values() if m.modality == modality]
        if len(candidates) == 1:
            return self.models[candidates[0]]
        if not candidates:
            raise not_found(f"no {modality} model is served (models: {', '.join(self.models)})")
        raise invalid_argument(f"several {modality} models are served ({', '.join(candidates)}): name one in "
                               "`model`")

    # ---- the work -------------------------------------------------------------------------------------------

    async def embed(self, request: EmbedRequest, timeout: float | None, *, wait: bool, method: str
                    ) -> EmbedResult:
        """Embed every input of `request` with one model. `timeout`: seconds left to the caller (None: no
        deadline); `wait`: wait for queue room instead of failing with RESOURCE_EXHAUSTED; `method`: the metric
        label of the calling endpoint. Raises ServeError."""
        start = time.perf_counter()
        deadline = None if timeout is None else time.monotonic() + timeout
        model_name = "-"  # metric label: a served model's name, never a client's arbitrary string
        try:
            model = self.model_for(request)
            model_name = model.name
            result = await self._embed_with(model, request, deadline, wait, start)
        except ServeError as exc:
            metrics.REQUESTS.labels(method, exc.code.name).inc()
            metrics.ERRORS.labels(model_name, exc.code.name).inc()
            log.info("request failed", extra={"method": method, "model": request.model, "code": exc.code.name,
                                              "reason": exc.message, "request_id": request.request_id})
            raise
        except asyncio.CancelledError:
            metrics.REQUESTS.labels(method, "CANCELLED").inc()
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must reach the client as INTERNAL, not a hang
            log.exception("request crashed", extra={"method": method, "model": model_name})
            metrics.REQUESTS.labels(method, "INTERNAL").inc()
            metrics.ERRORS.labels(model_name, "INTERNAL").inc()
            # the type only: an exception's text can carry object reprs and addresses (the log has it all)
            raise internal(f"internal error ({type(exc).__name__}); the server log has the details") from exc
        metrics.child(metrics.REQUESTS, method, "OK").inc()
        metrics.child(metrics.INPUTS, model.name).inc(len(request.inputs))
        metrics.child(metrics.STAGE_SECONDS, model.name, "total").observe(time.perf_counter() - start)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request", extra={"method": method, "model": model.name, "inputs": len(request.inputs),
                                        "total_ms": result.timings.total_ms, "request_id": request.request_id})
        return result

    async def _embed_with(self, model: Model, request: EmbedRequest, deadline: float | None, wait: bool,
                          start: float) -> EmbedResult:
        if self.draining:
            raise shutting_down()
        options = self._output_options(model, request.options)
        plan = chunk_plan(model, request.options.chunking)
        n = len(request.inputs)
        if n == 0:
            raise invalid_argument("request has no inputs")
        if n > self.config.max_request_inputs:
            raise invalid_argument(f"request has {n} inputs, the limit is {self.config.max_request_inputs} "
                                   "(split it, or use EmbedStream)")
        for i, inp in enumerate(request.inputs):
            try:
                check_modality(model, inp)
            except ServeError as exc:
                raise exc.for_input(i) from None
        batcher = model.batcher
        if batcher is None or batcher.state == "warming":
            raise unavailable(f"model {model.name} is warming up")
        # what the request alone tells (pooled outputs, images, raw PCM), before any decoding; exact after it
        self._check_least_response_size(model, request.inputs, options)
        await self._reserve(batcher, n, wait)
        reserved = n
        items: list[Item] = []
        try:
            size = sum(input_bytes(inp) for inp in request.inputs)
            async with self._budget.hold(size):
                prepared = await self._prepare_all(model, request.inputs, request.options.truncate, plan)
            self._bytes_since_trim += size
            self._check_response_size(model, prepared, options, plan)
            preprocess_s = time.perf_counter() - start
            metrics.child(metrics.STAGE_SECONDS, model.name, "preprocess").observe(preprocess_s)
            windows = sum(len(p.values) for p in prepared) - n  # a chunked input's windows beyond its first
            if windows:
                await self._reserve(batcher, windows, wait)
                reserved += windows
            items = [item for p in prepared for item in _items(model, p, options, plan, deadline)]
            batcher.submit(items)
        except BaseException:
            if not items:
                batcher.release(reserved)
            raise
        results = await self._relay.gather([it.future for it in items])
        return _result(model, request, prepared, results, options, plan, preprocess_s, time.perf_counter() - start)

    def _output_options(self, model: Model, requested: EmbedOptions) -> OutputOptions:
        """`output_options`, remembered per model and option set (invalid sets raise and are not kept)."""
        key = (model.name, requested.representation, requested.pooling, requested.normalize, requested.dtype)
        options = self._options.get(key)
        if options is None:
            options = self._options[key] = output_options(model, requested)
        return options

    def _check_response_size(self, model: Model, prepared: list[Prepared], options: OutputOptions,
                             plan: ChunkPlan | None) -> None:
        """Refuse before the model runs an answer that would exceed the message limit (positions x hidden x dtype;
        a chunked input's stitched positions, and its windows' outputs with the breakdown)."""
        limit_mb = self.config.max_message_mb
        per_position = int(model.meta["hidden_size"]) * options.dtype.itemsize
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

    def _check_least_response_size(self, model: Model, inputs: Sequence[Input], options: OutputOptions) -> None:
        """The same check before any decoding, from what the request alone tells (pooled outputs, images, raw PCM)."""
        per_position = int(model.meta["hidden_size"]) * options.dtype.itemsize
        size = sum(_EMBEDDING_OVERHEAD + per_position * (least_output_positions(model, inp)
                                                         if options.pooling == "none" else 1) for inp in inputs)
        _refuse_over_message_limit(size, self.config.max_message_mb)

    async def _reserve(self, batcher: Batcher, n: int, wait: bool) -> None:
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

    async def _prepare_all(self, model: Model, inputs: Sequence[Input], truncate: bool, plan: ChunkPlan | None
                           ) -> list[Prepared]:
        loop = asyncio.get_running_loop()
        if model.modality == "text":  # one encode_batch call for all the texts
            texts = [inp.value for inp in inputs]
            if plan is None and sum(len(t) for t in texts if isinstance(t, str)) <= _TOKENIZE_INLINE_CHARS:
                # tokenizing a few short texts costs less than the hop to the pool and back
                done = prepare_texts(model, texts, truncate, plan)
            else:
                done = await loop.run_in_executor(self.pool, prepare_texts, model, texts, truncate, plan)
        else:
            jobs = [loop.run_in_executor(self.pool, prepare, model, inp, truncate, plan) for inp in inputs]
            done = await asyncio.gather(*jobs, return_exceptions=True)
        for i, result in enumerate(done):
            if isinstance(result, ServeError):
                raise result.for_input(i)
            if isinstance(result, BaseException):
                log.error("preprocessing crashed", extra={"model": model.name, "input": i}, exc_info=result)
                raise internal(f"input {i}: preprocessing failed ({type(result).__name__}); the server log has the "
                               "details")
        return done


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
    return int(audio_frames(max(0, samples), model.meta["conv_layers"]))


def _items(model: Model, p: Prepared, options: OutputOptions, plan: ChunkPlan | None, deadline: float | None
           ) -> list[Item]:
    """The batch items of one prepared input: itself, or one per window (finished into its share of the join)."""
    if not p.windows:
        return [Item(p.value, model.cost(p.value), options.output, options, deadline)]
    alone = options if plan is not None and plan.details else None
    return [Item(value, model.cost(value), options.output, WindowPart(w, options.pooling, alone), deadline)
            for w, value in zip(p.windows, p.window_values, strict=True)]


def _embedding(model: Model, p: Prepared, results: list[ItemResult], options: OutputOptions,
               plan: ChunkPlan | None) -> Embedding:
    """An input's Embedding from its item results: as they are, or its windows joined."""
    if not p.windows:
        embedding = Embedding(results[0].value, results[0].positions, p.truncated)
        if plan is not None and plan.details:
            end = p.audio_seconds if model.modality == "audio" else results[0].positions
            embedding.windows = [WindowResult(0.0, end, results[0].positions, 0, results[0].positions,
                                              results[0].value)]
        return embedding
    parts = [r.value[0] for r in results]
    value = options.finish_vectors(join(parts, p.windows, options.pooling))
    positions = p.windows[-1].offset + p.windows[-1].positions
    embedding = Embedding(value, positions, p.truncated)
    if plan is not None and plan.details:
        # span of the input: audio seconds; text token positions (its tokens sit after the whole input's <s>)
        scale, shift = (1 / model.sample_rate, 0) if model.modality == "audio" else (1, 1)
        embedding.windows = [WindowResult(w.start * scale + shift, w.end * scale + shift, r.positions, w.keep[0],
                                          w.keep[1], r.value[1]) for w, r in zip(p.windows, results, strict=True)]
    return embedding


def _result(model: Model, request: EmbedRequest, prepared: list[Prepared], results: list[ItemResult],
            options: OutputOptions, plan: ChunkPlan | None, preprocess_s: float, total_s: float) -> EmbedResult:
    embeddings, first = [], 0
    for p in prepared:
        count = len(p.values)
        embeddings.append(_embedding(model, p, results[first: first + count], options, plan))
        first += count
    positions = [e.positions for e in embeddings]
    usage = Usage(inputs=len(embeddings), positions=sum(positions))
    if model.modality == "text":
        usage.tokens = sum(positions)
    elif model.modality == "audio":
        usage.audio_frames = sum(positions)
        usage.audio_seconds = sum(p.audio_seconds for p in prepared)
    else:
        usage.images = len(embeddings)
    timings = Timings(preprocess_ms=1000 * preprocess_s, queue_ms=1000 * max(r.queue_s for r in results),
                      inference_ms=1000 * max(r.run_s for r in results), total_ms=1000 * total_s)
    return EmbedResult(model.name, embeddings, usage, timings, request.request_id)


def model_info(model: Model) -> ModelInfo:
    meta = model.meta
    info = ModelInfo(
        name=model.name, modality=model.modality, hidden_size=int(meta["hidden_size"]),
        num_layers=int(meta.get("num_layers", 0)), precision=str(meta["precision"]),
        representations=[k for k in REPRESENTATIONS if k in model.outputs], execution_provider=model.runner.provider,
        ready=model.ready, file=model.path.name, metadata_json=model.public_metadata,
    )
    if model.chunk is not None:
        info.chunk_window, info.chunk_overlap = model.chunk.window, model.chunk.overlap
    if model.modality == "text":
        info.max_tokens = model.max_tokens
        info.max_chunked_tokens = model.chunk.max_tokens
    elif model.modality == "audio":
        info.max_chunked_audio_seconds = model.chunk.max_seconds
        info.max_audio_seconds = model.max_samples / model.sample_rate
        info.sample_rate = model.sample_rate
    else:
        info.image_size = model.image_size
    return info
