"""The d2v.v1.Embedder servicer (grpc.aio): proto messages <-> the embedding core's request and result.

Its methods receive the request bytes (see `add_to_server`): `wire.parse` turns a frame that is not the declared
message into INVALID_ARGUMENT, and the auth interceptor has answered before any byte is parsed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from .._proto.d2v.v1 import embedder_pb2 as pb
from ..core.describe import ModelInfo
from ..core.engine import EmbeddingCore
from ..core.request import Chunking, EmbedOptions, EmbedRequest, Input, Pcm
from ..core.results import EmbedResult
from ..errors import INPUT_INDEX_KEY, ServeError, shutting_down
from ..tracing import TRACE_HEADERS
from .tensors import NAMES, fill_tensor
from .wire import parse

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Embedder"].full_name  # d2v.v1.Embedder
_PARSE_INLINE_BYTES = 256 * 1024  # larger frames are parsed on the preprocessing pool, off the event loop

_MODALITIES = {"audio": pb.MODALITY_AUDIO, "image": pb.MODALITY_IMAGE, "text": pb.MODALITY_TEXT}
_REPRESENTATION_ENUMS = {"last": pb.REPRESENTATION_LAST_LAYER, "target": pb.REPRESENTATION_TARGET}
_REPRESENTATIONS = {pb.REPRESENTATION_UNSPECIFIED: "last", pb.REPRESENTATION_LAST_LAYER: "last",
                    pb.REPRESENTATION_TARGET: "target"}
_POOLINGS = {pb.POOLING_UNSPECIFIED: "mean", pb.POOLING_MEAN: "mean", pb.POOLING_NONE: "none",
             pb.POOLING_CLS: "cls"}
_DTYPES = {pb.DTYPE_UNSPECIFIED: "float32", **{enum: name for name, enum in NAMES.items()}}
_PCM_ENCODINGS = {pb.Pcm.ENCODING_FLOAT32: "float32", pb.Pcm.ENCODING_INT16: "int16"}


class EmbedderService:
    def __init__(self, core: EmbeddingCore) -> None:
        self.core = core

    async def Embed(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        try:
            request = await self._embed_request(raw, "Embed")
            request.trace_context = trace_context(context)
            result = await self.core.serve(request, timeout=context.time_remaining(), method="Embed")
            context.set_trailing_metadata(result.timing_headers())
            return embed_response(result)
        except ServeError as exc:
            error = exc
        if error.input_index >= 0:
            context.set_trailing_metadata(((INPUT_INDEX_KEY, str(error.input_index)),))
        await context.abort(error.code, error.message)
        raise AssertionError("unreachable: abort raises")

    async def EmbedStream(self, request_iterator: AsyncIterator[bytes],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.EmbedResponse]:
        drain = self.core.drain  # the stream as a whole is in flight too: the drain waits for it, a cut ends it
        with drain.tracked():
            slots = asyncio.Semaphore(self.core.config.stream_window)
            pending: asyncio.Queue[asyncio.Future | None] = asyncio.Queue()  # holds at most window + 1

            async def read() -> None:
                try:
                    async for raw in request_iterator:
                        await slots.acquire()  # at the window: stop reading, the client feels backpressure
                        pending.put_nowait(asyncio.ensure_future(self._stream_one(raw, context)))
                finally:
                    pending.put_nowait(None)

            reader = asyncio.create_task(read())
            try:
                while (task := await pending.get()) is not None:
                    response = await task
                    slots.release()
                    yield response
                await reader  # surfaces a failed read
            except asyncio.CancelledError:
                if not drain.cutting:
                    raise
            finally:
                reader.cancel()
                while not pending.empty():
                    if (task := pending.get_nowait()) is not None:
                        task.cancel()
        if drain.cutting:
            error = shutting_down()
            await context.abort(error.code, error.message)

    async def ListModels(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        try:
            parse(raw, pb.ListModelsRequest, "ListModels")
            return pb.ListModelsResponse(models=[model_info_message(info) for info in self.core.describe_all()])
        except ServeError as exc:
            error = exc
        await context.abort(error.code, error.message)
        raise AssertionError("unreachable: abort raises")

    async def DescribeModel(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        try:
            request = parse(raw, pb.DescribeModelRequest, "DescribeModel")
            return model_info_message(self.core.describe(request.model))
        except ServeError as exc:
            error = exc
        await context.abort(error.code, error.message)
        raise AssertionError("unreachable: abort raises")

    async def _stream_one(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        model = request_id = ""
        try:
            request = await self._embed_request(raw, "EmbedStream")
            model, request_id = request.model, request.request_id
            request.trace_context = trace_context(context)
            result = await self.core.serve(request, timeout=context.time_remaining(), wait=True, method="EmbedStream")
            return embed_response(result)
        except ServeError as exc:
            return pb.EmbedResponse(model=model, request_id=request_id, error=pb.Error(
                code=exc.code.value[0], message=exc.message, input_index=exc.input_index))

    async def _embed_request(self, raw: bytes, method: str) -> EmbedRequest:
        """The core's request from the frame's bytes; a large frame is parsed on the pool (it takes milliseconds per
        MiB: UTF-8 checks, copies) so that the event loop keeps answering other calls meanwhile."""
        if len(raw) <= _PARSE_INLINE_BYTES:
            return parse_embed_request(raw, method)
        return await asyncio.get_running_loop().run_in_executor(self.core.pool, parse_embed_request, raw, method)


def trace_context(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """The caller's W3C trace headers, from the call's metadata."""
    return {key: value for key, value in context.invocation_metadata() or () if key in TRACE_HEADERS}


def parse_embed_request(raw: bytes, method: str) -> EmbedRequest:
    return embed_request(parse(raw, pb.EmbedRequest, method))


def add_to_server(service: EmbedderService, server: grpc.aio.Server) -> None:
    """Register the servicer as the generated `add_EmbedderServicer_to_server` does, except that each method gets
    the request bytes unparsed (no request deserializer): the method parses them with `wire.parse`."""
    def unary(method: object, response: type) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(method, response_serializer=response.SerializeToString)

    handlers = {
        "Embed": unary(service.Embed, pb.EmbedResponse),
        "EmbedStream": grpc.stream_stream_rpc_method_handler(
            service.EmbedStream, response_serializer=pb.EmbedResponse.SerializeToString),
        "ListModels": unary(service.ListModels, pb.ListModelsResponse),
        "DescribeModel": unary(service.DescribeModel, pb.ModelInfo),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


# ---- proto <-> core -------------------------------------------------------------------------------------------


def embed_request(request: pb.EmbedRequest) -> EmbedRequest:
    """The core's request; enum values this server does not know pass through as their number (the core refuses
    them)."""
    o = request.options
    options = EmbedOptions(
        representation=_REPRESENTATIONS.get(o.representation, str(o.representation)),
        pooling=_POOLINGS.get(o.pooling, str(o.pooling)), normalize=o.normalize,
        dtype=_DTYPES.get(o.dtype, str(o.dtype)), truncate=o.truncate, chunking=_chunking(o.chunking))
    return EmbedRequest([_input(inp) for inp in request.inputs], request.model, options, request.request_id)


def _chunking(c: pb.Chunking) -> Chunking:
    return Chunking(c.enabled, c.window, c.overlap if c.HasField("overlap") else None, c.windows)


def _input(inp: pb.Input) -> Input:
    kind = inp.WhichOneof("kind")
    if kind is None:
        return Input("")
    if kind == "pcm":
        p = inp.pcm
        return Input(kind, Pcm(p.data, _PCM_ENCODINGS.get(p.encoding, str(p.encoding)), p.sample_rate,
                               p.channels or 1))
    return Input(kind, getattr(inp, kind))


def embed_response(result: EmbedResult) -> pb.EmbedResponse:
    """Built in place, field by field: nested messages passed to a constructor would each be copied into it."""
    response = pb.EmbedResponse(model=result.model, request_id=result.request_id)
    u, usage = result.usage, response.usage
    usage.inputs, usage.positions, usage.tokens = u.inputs, u.positions, u.tokens
    usage.audio_frames, usage.audio_seconds, usage.images = u.audio_frames, u.audio_seconds, u.images
    t, timings = result.timings, response.timings
    timings.preprocess_ms, timings.queue_ms, timings.inference_ms = t.preprocess_ms, t.queue_ms, t.inference_ms
    timings.total_ms = t.total_ms
    for e in result.embeddings:
        embedding = response.embeddings.add(positions=e.positions, truncated=e.truncated)
        fill_tensor(embedding.tensor, e.value, result.dtype)
        for w in e.windows or ():
            window = embedding.windows.add(start=w.start, end=w.end, positions=w.positions,
                                           kept_start=w.kept_start, kept_end=w.kept_end)
            fill_tensor(window.tensor, w.value, result.dtype)
    return response


def model_info_message(info: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=info.name, modality=_MODALITIES[info.modality], hidden_size=info.hidden_size,
        num_layers=info.num_layers, precision=info.precision,
        representations=[_REPRESENTATION_ENUMS[r] for r in info.representations],
        execution_provider=info.execution_provider, ready=info.ready, file=info.file,
        metadata_json=info.metadata_json, max_tokens=info.max_tokens, max_audio_seconds=info.max_audio_seconds,
        image_size=info.image_size, sample_rate=info.sample_rate, chunk_window=info.chunk_window,
        chunk_overlap=info.chunk_overlap, max_chunked_audio_seconds=info.max_chunked_audio_seconds,
        max_chunked_tokens=info.max_chunked_tokens, file_sha256=info.file_sha256, loaded_at=info.loaded_at)
