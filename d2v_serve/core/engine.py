"""The embedding core: the one entry every transport calls (`EmbeddingCore.serve`) and the model facts
(`describe`).

A transport (the gRPC service, the HTTP app, a bulk job) translates its wire request into a `request.EmbedRequest`,
awaits `serve`, and packs the `EmbedResult` (numpy arrays and plain numbers) into its own response. `serve` owns what
every call needs: it is tracked for the drain, held to its deadline, refused while draining, and cut off with
UNAVAILABLE when the drain's grace is over. A failure is one `ServeError(code, message, input_index)`; the codes are
the canonical gRPC status codes, which each transport maps to its own statuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Awaitable, Sequence
from concurrent.futures import Executor
from typing import TypeVar

from .. import metrics
from ..config import ServerConfig
from ..errors import ServeError, deadline_exceeded, internal, invalid_argument, not_found, shutting_down
from ..models.registry import Model
from ..tracing import CallStamps, Tracing
from . import admission, assembly
from .batcher import Item
from .budget import ByteBudget
from .chunking import ChunkPlan
from .describe import ModelInfo, describe
from .drain import Drain
from .memory import release_free_memory
from .postprocess import OutputOptions, output_options
from .preparation import Prepared, chunk_plan, input_bytes, input_modality, prepare, prepare_texts
from .relay import Relay
from .request import EmbedOptions, EmbedRequest, Input
from .results import EmbedResult

log = logging.getLogger(__name__)

_TRIM_AFTER_BYTES = 64 * 2**20  # idle again after preprocessing this much: hand freed heap back to the OS
_TOKENIZE_INLINE_CHARS = 1024  # texts up to this many characters in all are tokenized on the event loop
T = TypeVar("T")


class EmbeddingCore:
    def __init__(self, models: dict[str, Model], pool: Executor, config: ServerConfig,
                 tracing: Tracing | None = None) -> None:
        self.models = models
        self.pool = pool
        self.config = config
        self.tracing = tracing or Tracing()
        self.drain = Drain(on_idle=self._release_memory_if_due)
        self._budget = ByteBudget(config.max_preprocess_mb * 2**20)
        self._relay = Relay()
        self._options: dict[tuple, OutputOptions] = {}  # valid option sets per model: a few dozen at most
        self._bytes_since_trim = 0

    # ---- the entry ------------------------------------------------------------------------------------------

    async def serve(self, request: EmbedRequest, *, timeout: float | None, wait: bool = False,
                    method: str) -> EmbedResult:
        """Embed every input of `request` with one model: the one call of every transport. `timeout`: seconds left
        to the caller (None: no deadline), DEADLINE_EXCEEDED past it; `wait`: wait for queue room instead of failing
        with RESOURCE_EXHAUSTED (streams, bulk jobs); `method`: the metric label of the calling endpoint. The call
        counts as in flight for the drain; while draining it fails with UNAVAILABLE, and when the drain's grace is
        over it is cancelled and fails with UNAVAILABLE too. Raises ServeError; a caller that goes away cancels it."""
        with self.drain.tracked():
            try:
                return await _within(self._embed(request, timeout, wait, method), timeout)
            except (TimeoutError, asyncio.TimeoutError):  # distinct classes before Python 3.11
                raise deadline_exceeded(f"no result within {timeout:g} s") from None
            except asyncio.CancelledError:
                if not self.drain.cutting:  # the caller went away
                    raise
                raise shutting_down() from None  # the drain's grace ran out: UNAVAILABLE, not a dropped call

    def describe(self, name: str) -> ModelInfo:
        """A served model's facts; NOT_FOUND for a name that is not served."""
        return describe(self.named_model(name))

    def describe_all(self) -> list[ModelInfo]:
        return [describe(m) for m in self.models.values()]

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

    async def _embed(self, request: EmbedRequest, timeout: float | None, wait: bool, method: str) -> EmbedResult:
        start = time.perf_counter()
        stamps = CallStamps()
        deadline = None if timeout is None else stamps.start + timeout
        model_name = "-"  # metric label: a served model's name, never a client's arbitrary string
        error = "CANCELLED"  # until the call ends otherwise
        model: Model | None = None
        try:
            model = self.model_for(request)
            model_name = model.name
            model.calls += 1  # a model replaced by a reload retires once its calls are done
            result = await self._embed_with(model, request, deadline, wait, start, stamps)
            error = ""
        except ServeError as exc:
            error = exc.code.name
            metrics.REQUESTS.labels(method, exc.code.name).inc()
            metrics.ERRORS.labels(model_name, exc.code.name).inc()
            log.info("request failed", extra={"method": method, "model": request.model, "code": exc.code.name,
                                              "reason": exc.message, "request_id": request.request_id})
            raise
        except asyncio.CancelledError:
            metrics.REQUESTS.labels(method, "CANCELLED").inc()
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must reach the client as INTERNAL, not a hang
            error = "INTERNAL"
            log.exception("request crashed", extra={"method": method, "model": model_name})
            metrics.REQUESTS.labels(method, "INTERNAL").inc()
            metrics.ERRORS.labels(model_name, "INTERNAL").inc()
            # the type only: an exception's text can carry object reprs and addresses (the log has it all)
            raise internal(f"internal error ({type(exc).__name__}); the server log has the details") from exc
        finally:
            if model is not None:
                model.calls -= 1
            if self.tracing.enabled:
                stamps.end = time.monotonic()
                self.tracing.record(method, model_name, stamps, request.trace_context, inputs=len(request.inputs),
                                    error=error)
        metrics.child(metrics.REQUESTS, method, "OK").inc()
        metrics.child(metrics.INPUTS, model.name).inc(len(request.inputs))
        metrics.child(metrics.STAGE_SECONDS, model.name, "total").observe(time.perf_counter() - start)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request", extra={"method": method, "model": model.name, "inputs": len(request.inputs),
                                        "total_ms": result.timings.total_ms, "request_id": request.request_id})
        return result

    async def _embed_with(self, model: Model, request: EmbedRequest, deadline: float | None, wait: bool,
                          start: float, stamps: CallStamps) -> EmbedResult:
        if self.drain.draining:
            raise shutting_down()
        dimensions = request.options.dimensions
        if dimensions is not None and dimensions != model.meta.hidden_size:
            raise invalid_argument(f"model {model.name} gives {model.meta.hidden_size} dimensions; dimensions="
                                   f"{dimensions} is not supported")
        options = self._output_options(model, request.options)
        plan = chunk_plan(model, request.options.chunking)
        admission.check_inputs(model, request.inputs, self.config)
        batcher = admission.ready_batcher(model)
        # what the request alone tells (pooled outputs, images, raw PCM), before any decoding; exact after it
        admission.check_least_response_size(model, request.inputs, options, self.config.max_message_mb)
        n = len(request.inputs)
        await admission.reserve(batcher, n, wait)
        reserved = n
        stamps.admitted = time.monotonic()
        items: list[Item] = []
        try:
            size = sum(input_bytes(inp) for inp in request.inputs)
            async with self._budget.hold(size):
                prepared = await self._prepare_all(model, request.inputs, request.options.truncate, plan)
            self._bytes_since_trim += size
            admission.check_response_size(model, prepared, options, plan, self.config.max_message_mb)
            preprocess_s = time.perf_counter() - start
            metrics.child(metrics.STAGE_SECONDS, model.name, "preprocess").observe(preprocess_s)
            windows = sum(len(p.values) for p in prepared) - n  # a chunked input's windows beyond its first
            if windows:
                await admission.reserve(batcher, windows, wait)
                reserved += windows
            items = [item for p in prepared for item in assembly.batch_items(model, p, options, plan, deadline)]
            batcher.submit(items)
            stamps.preprocessed = time.monotonic()
        except BaseException:
            if not items:
                batcher.release(reserved)
            raise
        try:
            results = await self._relay.gather([it.future for it in items])
        except BaseException:
            batcher.cancelled()  # the relay cancelled the call's queued inputs: the batcher drops them
            raise
        stamps.batches = [r.batch for r in results if r.batch is not None]
        return assembly.result(model, request, prepared, results, options, plan, preprocess_s,
                               time.perf_counter() - start)

    def _output_options(self, model: Model, requested: EmbedOptions) -> OutputOptions:
        """`output_options`, remembered per model and option set (invalid sets raise and are not kept)."""
        key = (model.name, requested.representation, requested.pooling, requested.normalize, requested.dtype)
        options = self._options.get(key)
        if options is None:
            options = self._options[key] = output_options(model, requested)
        return options

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

    def _release_memory_if_due(self) -> None:
        """After a burst of large inputs, idle again: give freed heap pages back (glibc keeps them otherwise)."""
        if self._bytes_since_trim >= _TRIM_AFTER_BYTES:
            self._bytes_since_trim = 0
            with contextlib.suppress(RuntimeError):  # the pool is already shut down: the server is stopping
                self.pool.submit(release_free_memory)


async def _within(call: Awaitable[T], seconds: float | None) -> T:
    """`call` with a deadline (TimeoutError); on 3.11+ without wait_for's extra task per call."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await call
    return await asyncio.wait_for(call, seconds)
