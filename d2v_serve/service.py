"""The d2v.v1.Embedder servicer (grpc.aio): validate, preprocess on the pool, queue on the model's batcher, answer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import Executor

import grpc

from . import metrics
from ._proto.d2v.v1 import embedder_pb2 as pb
from ._proto.d2v.v1 import embedder_pb2_grpc as pb_grpc
from .batcher import Batcher, Item, ItemResult
from .config import ServerConfig
from .errors import INPUT_INDEX_KEY, ServeError, internal, invalid_argument, not_found, unavailable
from .inputs import Prepared, check_modality, input_modality, prepare
from .postprocess import output_options
from .registry import REPRESENTATIONS, Model

log = logging.getLogger(__name__)

_MODALITIES = {"audio": pb.MODALITY_AUDIO, "image": pb.MODALITY_IMAGE, "text": pb.MODALITY_TEXT}
_REPRESENTATION_ENUMS = {"last": pb.REPRESENTATION_LAST_LAYER, "target": pb.REPRESENTATION_TARGET}
_STREAM_RETRY_S = (0.002, 0.05)  # a stream waits for queue room (backpressure) polling between these bounds


class EmbedderService(pb_grpc.EmbedderServicer):
    def __init__(self, models: dict[str, Model], pool: Executor, config: ServerConfig) -> None:
        self.models = models
        self.pool = pool
        self.config = config
        self.draining = False
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

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

    @contextlib.contextmanager
    def _tracked(self) -> Iterator[None]:
        self._inflight += 1
        self._idle.clear()
        metrics.INFLIGHT.inc()
        try:
            yield
        finally:
            self._inflight -= 1
            metrics.INFLIGHT.dec()
            if self._inflight == 0:
                self._idle.set()

    # ---- RPCs -----------------------------------------------------------------------------------------------

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        with self._tracked():
            try:
                return await self._embed(request, context.time_remaining(), wait=False, method="Embed")
            except ServeError as exc:
                error = exc
        if error.input_index >= 0:
            context.set_trailing_metadata(((INPUT_INDEX_KEY, str(error.input_index)),))
        await context.abort(error.code, error.message)
        raise AssertionError("unreachable: abort raises")

    async def EmbedStream(self, request_iterator: AsyncIterator[pb.EmbedRequest],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.EmbedResponse]:
        with self._tracked():
            slots = asyncio.Semaphore(self.config.stream_window)
            pending: asyncio.Queue[asyncio.Future | None] = asyncio.Queue()  # holds at most window + 1

            async def read() -> None:
                try:
                    async for request in request_iterator:
                        await slots.acquire()  # at the window: stop reading, the client feels backpressure
                        pending.put_nowait(asyncio.ensure_future(self._stream_one(request, context)))
                finally:
                    pending.put_nowait(None)

            reader = asyncio.create_task(read())
            try:
                while (task := await pending.get()) is not None:
                    response = await task
                    slots.release()
                    yield response
                await reader  # surfaces a failed read
            finally:
                reader.cancel()
                while not pending.empty():
                    if (task := pending.get_nowait()) is not None:
                        task.cancel()

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_info(m) for m in self.models.values()])

    async def DescribeModel(self, request: pb.DescribeModelRequest, context: grpc.aio.ServicerContext
                            ) -> pb.ModelInfo:
        try:
            return model_info(self._named_model(request.model))
        except ServeError as exc:
            error = exc
        await context.abort(error.code, error.message)
        raise AssertionError("unreachable: abort raises")

    # ---- the work -------------------------------------------------------------------------------------------

    async def _stream_one(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        try:
            return await self._embed(request, context.time_remaining(), wait=True, method="EmbedStream")
        except ServeError as exc:
            return pb.EmbedResponse(model=request.model, request_id=request.request_id, error=pb.Error(
                code=exc.code.value[0], message=exc.message, input_index=exc.input_index))

    async def _embed(self, request: pb.EmbedRequest, remaining: float | None, wait: bool, method: str
                     ) -> pb.EmbedResponse:
        start = time.perf_counter()
        deadline = None if remaining is None else time.monotonic() + remaining
        model_name = "-"  # metric label: a served model's name, never a client's arbitrary string
        try:
            model = self._model_for(request)
            model_name = model.name
            response = await self._embed_with(model, request, deadline, wait, start)
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
            raise internal(f"{type(exc).__name__}: {exc}") from exc
        metrics.REQUESTS.labels(method, "OK").inc()
        metrics.INPUTS.labels(model.name).inc(len(request.inputs))
        metrics.STAGE_SECONDS.labels(model.name, "total").observe(time.perf_counter() - start)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request", extra={"method": method, "model": model.name, "inputs": len(request.inputs),
                                        "total_ms": response.timings.total_ms, "request_id": request.request_id})
        return response

    async def _embed_with(self, model: Model, request: pb.EmbedRequest, deadline: float | None, wait: bool,
                          start: float) -> pb.EmbedResponse:
        if self.draining:
            raise unavailable("server is shutting down; retry on another replica")
        options = output_options(model, request.options)
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
        await self._reserve(batcher, n, wait)
        items: list[Item] = []
        try:
            prepared = await self._prepare_all(model, request.inputs, request.options.truncate)
            preprocess_s = time.perf_counter() - start
            metrics.STAGE_SECONDS.labels(model.name, "preprocess").observe(preprocess_s)
            items = [Item(p.value, model.cost(p.value), options.output, options, deadline) for p in prepared]
            batcher.submit(items)
        except BaseException:
            if not items:
                batcher.release(n)
            raise
        results = await _gather_items(items)
        return _response(model, request, prepared, results, preprocess_s, time.perf_counter() - start)

    async def _reserve(self, batcher: Batcher, n: int, wait: bool) -> None:
        delay = _STREAM_RETRY_S[0]
        while True:
            try:
                batcher.reserve(n)
                return
            except ServeError as exc:
                if not wait or exc.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
            await asyncio.sleep(delay)
            delay = min(2 * delay, _STREAM_RETRY_S[1])

    async def _prepare_all(self, model: Model, inputs: Sequence[pb.Input], truncate: bool) -> list[Prepared]:
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(self.pool, prepare, model, inp, truncate) for inp in inputs]
        done = await asyncio.gather(*jobs, return_exceptions=True)
        for i, result in enumerate(done):
            if isinstance(result, ServeError):
                raise result.for_input(i)
            if isinstance(result, BaseException):
                log.error("preprocessing crashed", extra={"model": model.name, "input": i}, exc_info=result)
                raise internal(f"input {i}: preprocessing failed: {type(result).__name__}: {result}")
        return done

    def _model_for(self, request: pb.EmbedRequest) -> Model:
        if request.model:
            return self._named_model(request.model)
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

    def _named_model(self, name: str) -> Model:
        if name not in self.models:
            raise not_found(f"unknown model {name!r} (models: {', '.join(self.models)})")
        return self.models[name]


async def _gather_items(items: list[Item]) -> list[ItemResult]:
    """All item results; on the first failure the rest are cancelled (dropped at dequeue if still queued)."""
    futures = [asyncio.wrap_future(it.future) for it in items]
    try:
        return await asyncio.gather(*futures)
    except BaseException:
        for f in futures:
            f.cancel()
        raise


def _response(model: Model, request: pb.EmbedRequest, prepared: list[Prepared], results: list[ItemResult],
              preprocess_s: float, total_s: float) -> pb.EmbedResponse:
    positions = [r.positions for r in results]
    usage = pb.Usage(inputs=len(results), positions=sum(positions))
    if model.modality == "text":
        usage.tokens = sum(len(p.value) for p in prepared)
    elif model.modality == "audio":
        usage.audio_frames = sum(positions)
        usage.audio_seconds = sum(p.audio_seconds for p in prepared)
    else:
        usage.images = len(results)
    timings = pb.Timings(preprocess_ms=1000 * preprocess_s, queue_ms=1000 * max(r.queue_s for r in results),
                         inference_ms=1000 * max(r.run_s for r in results), total_ms=1000 * total_s)
    embeddings = [pb.Embedding(tensor=r.value, positions=r.positions, truncated=p.truncated)
                  for r, p in zip(results, prepared, strict=True)]
    return pb.EmbedResponse(model=model.name, embeddings=embeddings, usage=usage, timings=timings,
                            request_id=request.request_id)


def model_info(model: Model) -> pb.ModelInfo:
    meta = model.meta
    info = pb.ModelInfo(
        name=model.name, modality=_MODALITIES[model.modality], hidden_size=int(meta["hidden_size"]),
        num_layers=int(meta.get("num_layers", 0)), precision=str(meta["precision"]),
        representations=[_REPRESENTATION_ENUMS[k] for k in REPRESENTATIONS if k in model.outputs],
        execution_provider=model.runner.provider, ready=model.ready, file=model.path.name,
        metadata_json=model.public_metadata,
    )
    if model.modality == "text":
        info.max_tokens = model.max_tokens
    elif model.modality == "audio":
        info.max_audio_seconds = model.max_samples / model.sample_rate
        info.sample_rate = model.sample_rate
    else:
        info.image_size = model.image_size
    return info
