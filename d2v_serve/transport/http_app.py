"""The HTTP/JSON transport (FastAPI): JSON bodies <-> the embedding core's request and result, statuses mapped.

Routes: OpenAI-compatible `POST /v1/embeddings` (mean pooled, L2-normalised float32, as OpenAI clients expect),
`POST /v1/embed` (a JSON mirror of the gRPC Embed call), `GET /v1/models[/{id}]`, `GET /health` (200 only while
SERVING), `GET /metrics`, FastAPI's `/openapi.json`, `/docs` and `/redoc` (their assets served from the installed
package), and `GET /` (where those are). Errors have OpenAI's shape,
`{"error": {"message", "type", "param", "code", "input_index"}}`, with `code` the gRPC status name in lower case.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np
import orjson
from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import ServerConfig
from ..core.describe import ModelInfo
from ..core.engine import EmbeddingCore
from ..core.request import Chunking, EmbedOptions, EmbedRequest, Input, Pcm
from ..core.results import EmbedResult
from ..errors import ServeError, invalid_argument
from ..media import is_data_uri, parse_data_uri
from ..tracing import TRACE_HEADERS
from .http_schema import (
    EmbedBody,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbedResponseBody,
    ErrorResponse,
    InputBody,
    ModelCard,
    ModelList,
)

log = logging.getLogger(__name__)

TIMEOUT_HEADER = "x-d2v-timeout-s"  # a client's deadline in seconds (the server's --http-timeout-s caps it)
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.FAILED_PRECONDITION: 422,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_HTTP_ONLY_CODES = {404: "not_found", 405: "unimplemented", 413: "resource_exhausted"}  # framework-level refusals
_RETRY_AFTER_S = "1"  # on 429 and 503: the queue drains in milliseconds; a draining replica is gone in seconds
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 422, 429, 500, 503, 504)}
_AUTH_EXEMPT = ("/health", "/metrics", "/openapi.json", "/docs", "/redoc")  # prefixes
DOCS_STATIC = "/docs/static"
_MEDIA_KINDS = {"audio": "audio", "image": "image"}  # data: URI type -> input kind
_REQUEST_MODELS = (EmbeddingsRequest, EmbedBody)
Body = TypeVar("Body", bound=BaseModel)
T = TypeVar("T")


# ---- errors -----------------------------------------------------------------------------------------------------


def error_response(status: int, message: str, code: str, input_index: int = -1) -> JSONResponse:
    if status == 401:
        kind = "authentication_error"
    elif status == 429:
        kind = "rate_limit_error"
    elif status >= 500:
        kind = "server_error"
    else:
        kind = "invalid_request_error"
    error = {"message": message, "type": kind, "param": "input" if input_index >= 0 else None, "code": code,
             "input_index": input_index if input_index >= 0 else None}
    headers = {"Retry-After": _RETRY_AFTER_S} if status in (429, 503) else None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def serve_error_response(exc: ServeError) -> JSONResponse:
    return error_response(HTTP_STATUS.get(exc.code, 500), exc.message, exc.code.name.lower(), exc.input_index)


def _validation_message(errors: Sequence[Mapping[str, Any]]) -> tuple[str, int]:
    """One line for the first problem, and the index of the input it concerns (-1: none)."""
    first = errors[0]
    loc = list(first.get("loc", ()))
    if loc[:1] == ["body"]:
        loc = loc[1:]
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", -1
    if not loc and first.get("type") == "model_type":
        return "the request body must be a JSON object", -1
    index = loc[1] if len(loc) > 1 and loc[0] in ("input", "inputs") and isinstance(loc[1], int) else -1
    where = ".".join(str(x) for x in loc)
    message = f"{where}: {first['msg']}" if where else f"request body: {first['msg']}"
    return " ".join(message.split()), index


async def parse_body(request: Request, model: type[Body]) -> Body:
    """The JSON body validated as `model` by pydantic's own parser (no json.loads step); raises
    RequestValidationError."""
    raw = await request.body()
    if not raw.strip():
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "a JSON request body is required"}])
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_input=False)) from None


class BearerAuth:
    """Refuse /v1/ calls without `Authorization: Bearer <token>` before any body is read (pure ASGI)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/" and not scope["path"].startswith(_AUTH_EXEMPT):
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self._expected):
                response = error_response(401, "missing or invalid bearer token (Authorization: Bearer ...)",
                                          "unauthenticated")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for a request body over `limit` bytes: at once from its Content-Length, else once that much arrived."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
        if declared.isdigit() and int(declared) > self.limit:
            await error_response(413, _too_large(self.limit), "resource_exhausted")(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise StarletteHTTPException(413)  # the app's handler answers (FastAPI re-raises these)
            return message

        await self.app(scope, limited, send)


def _too_large(limit: int) -> str:
    return f"request body is larger than {limit / 2**20:g} MiB (--max-message-mb)"


# ---- JSON -> the core's request ---------------------------------------------------------------------------------


def decode_base64(text: str, what: str) -> bytes:
    """Standard base64, or the payload of a `data:<type>;base64,` URI. Raises ServeError."""
    if is_data_uri(text):
        return _data_uri(text, what)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise invalid_argument(f"{what} is not valid base64") from None


def _data_uri(text: str, what: str) -> tuple[str, bytes]:
    try:
        return parse_data_uri(text)
    except ValueError as exc:
        raise invalid_argument(f"{what}: {exc}") from None


def openai_input(item: Any, modality: str | None) -> Input:
    """One `input` item: text for a text model, else a data: URI whose type says audio or image."""
    if isinstance(item, (int, list)):
        raise invalid_argument("token-id input is not supported: send the text")
    if not isinstance(item, str):
        raise invalid_argument("must be a string")
    if modality == "text":
        return Input("text", item)
    if is_data_uri(item):
        media_type, payload = _data_uri(item, "the data URI")
        kind = _MEDIA_KINDS.get(media_type.split("/", 1)[0].lower(), modality)
        if kind not in ("audio", "image"):
            raise invalid_argument("a data URI of type audio/* or image/* is expected")
        return Input(kind, payload)
    if modality in ("audio", "image"):
        raise invalid_argument(f"model takes {modality}: send a data:{modality}/...;base64, URI of the file")
    return Input("text", item)


def native_input(body: InputBody) -> Input:
    given = [k for k in ("text", "audio", "image", "pcm") if getattr(body, k) is not None]
    if not given:
        return Input("")  # the core refuses it, as it does an empty gRPC Input
    if len(given) > 1:
        raise invalid_argument(f"set exactly one of text, audio, image, pcm (got {', '.join(given)})")
    kind = given[0]
    if kind == "text":
        return Input("text", body.text)
    if kind == "pcm":
        p = body.pcm
        return Input("pcm", Pcm(decode_base64(p.data, "pcm.data"), p.encoding, p.sample_rate, p.channels))
    return Input(kind, decode_base64(getattr(body, kind), kind))


def _each(items: list[Any], translate: Callable[[Any], Input]) -> list[Input]:
    inputs = []
    for i, item in enumerate(items):
        try:
            inputs.append(translate(item))
        except ServeError as exc:
            raise exc.for_input(i) from None
    return inputs


def _timeout(config: ServerConfig, headers: Mapping[str, str]) -> float | None:
    server = config.http_timeout_s or None
    raw = headers.get(TIMEOUT_HEADER)
    if raw is None:
        return server
    try:
        client = float(raw)
    except ValueError:
        client = -1.0
    if not client > 0:
        raise invalid_argument(f"{TIMEOUT_HEADER} must be a number of seconds > 0, got {raw!r}")
    return client if server is None else min(client, server)


# ---- the app ----------------------------------------------------------------------------------------------------


def _json(payload: Any, headers: Sequence[tuple[str, str]] = ()) -> Response:
    """orjson writes numpy arrays itself, each float in its shortest round-trip form for its dtype (float32
    values come back bit-identical), about 15x faster than json.dumps over a list of Python floats."""
    return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json",
                    headers=dict(headers))


def _b64(value: np.ndarray) -> str:
    return base64.b64encode(value.tobytes()).decode("ascii")  # the core's arrays are little-endian, C order


def _as_is(value: np.ndarray) -> np.ndarray:
    return value


def _modality(core: EmbeddingCore, name: str) -> str | None:
    """The named model's modality; None when no model is named or the name is not served (the core answers)."""
    if not name:
        return None
    try:
        return core.describe(name).modality
    except ServeError:
        return None


def _card(info: ModelInfo) -> dict[str, Any]:
    fields = dataclasses.asdict(info)
    created = fields.pop("created")
    fields["metadata"] = orjson.loads(fields.pop("metadata_json") or "{}")
    return {"id": info.name, "object": "model", "created": created, "owned_by": "d2v", "d2v": fields}


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """FastAPI's schema, plus the request bodies that the routes validate themselves."""

    def schema() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            _, defs = models_json_schema([(m, "validation") for m in _REQUEST_MODELS],
                                         ref_template="#/components/schemas/{model}")
            spec.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            app.openapi_schema = spec
        return app.openapi_schema

    return schema


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def create_app(core: EmbeddingCore, config: ServerConfig, serving: Callable[[], bool]) -> FastAPI:
    """The ASGI app over `core`; `serving()` answers /health."""
    token = config.bearer_token()
    limit = config.max_message_mb * 2**20
    # FastAPIOffline: FastAPI with /docs and /redoc whose scripts and styles come from the installed package (under
    # /docs/static, auth-exempt with /docs), so they render air-gapped
    app = FastAPIOffline(title="d2v", version="1", static_url=DOCS_STATIC,
                         description="Contextualized data2vec embeddings of text, images and audio. The same models, "
                                     "batchers and limits as the gRPC service d2v.v1.Embedder.")
    security = [Security(HTTPBearer(auto_error=False))] if token else []  # documents the scheme; BearerAuth checks
    app.add_middleware(BodyLimit, limit=limit)
    if token:
        app.add_middleware(BearerAuth, token=token)  # added last, runs first: no body is read for a stranger

    app.openapi = _openapi(app)  # type: ignore[method-assign]

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, index = _validation_message(exc.errors())
        return error_response(400, message, "invalid_argument", index)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {
            404: f"no route {request.url.path}",
            405: f"{request.method} is not allowed on {request.url.path}",
            413: _too_large(limit),
        }.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, message, _HTTP_ONLY_CODES.get(exc.status_code, "unknown"))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("http request crashed", extra={"path": request.url.path})
        # the type only: an exception's text can carry object reprs and addresses (the log has it all)
        return error_response(500, f"internal error ({type(exc).__name__}); the server log has the details",
                              "internal")

    async def embed_with_core(request: EmbedRequest, headers: Mapping[str, str], method: str) -> EmbedResult:
        request.trace_context = {key: headers[key] for key in TRACE_HEADERS if key in headers}
        return await core.serve(request, timeout=_timeout(config, headers), method=method)

    @app.post("/v1/embeddings", response_model=EmbeddingsResponse, responses=_ERRORS, dependencies=security,
              summary="OpenAI-compatible embeddings (mean pooled, L2-normalised)",
              openapi_extra=_json_body(EmbeddingsRequest))
    async def embeddings(request: Request) -> Response:
        body = await parse_body(request, EmbeddingsRequest)
        items = [body.input] if isinstance(body.input, str) else body.input
        modality = _modality(core, body.model)
        try:
            inputs = _each(items, lambda item: openai_input(item, modality))
            compact = body.encoding_format not in ("float", "base64")
            options = EmbedOptions(normalize=True, dimensions=body.dimensions,
                                   dtype=body.encoding_format if compact else "float32")
            result = await embed_with_core(EmbedRequest(inputs, body.model, options), request.headers,
                                           "/v1/embeddings")
        except ServeError as exc:
            return serve_error_response(exc)
        encode = _b64 if body.encoding_format == "base64" else _as_is
        data = [{"object": "embedding", "index": i, "embedding": encode(e.value)}
                for i, e in enumerate(result.embeddings)]
        tokens = result.usage.tokens or result.usage.positions
        return _json({"object": "list", "data": data, "model": result.model,
                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}, result.timing_headers())

    @app.post("/v1/embed", response_model=EmbedResponseBody, responses=_ERRORS, dependencies=security,
              summary="Embed: a JSON mirror of the gRPC d2v.v1.Embedder/Embed call",
              openapi_extra=_json_body(EmbedBody))
    async def embed(request: Request) -> Response:
        body = await parse_body(request, EmbedBody)
        try:
            inputs = _each(body.inputs, native_input)
            fields = body.options.model_dump()
            options = EmbedOptions(**{**fields, "chunking": Chunking(**fields["chunking"])})
            result = await embed_with_core(EmbedRequest(inputs, body.model, options, body.request_id),
                                           request.headers, "/v1/embed")
        except ServeError as exc:
            return serve_error_response(exc)
        encode = _b64 if body.data_format == "base64" else _as_is

        def tensor(value: np.ndarray) -> dict[str, Any]:
            return {"shape": list(value.shape), "dtype": result.dtype, "data": encode(value)}

        embeddings = []
        for e in result.embeddings:
            embedding = {"tensor": tensor(e.value), "positions": e.positions, "truncated": e.truncated}
            if e.windows is not None:
                embedding["windows"] = [{"start": w.start, "end": w.end, "positions": w.positions,
                                         "kept_start": w.kept_start, "kept_end": w.kept_end,
                                         "tensor": tensor(w.value)} for w in e.windows]
            embeddings.append(embedding)
        return _json({"model": result.model, "embeddings": embeddings, "usage": dataclasses.asdict(result.usage),
                      "timings": dataclasses.asdict(result.timings), "request_id": result.request_id},
                     result.timing_headers())

    @app.get("/v1/models", response_model=ModelList, dependencies=security, summary="The served models")
    async def list_models() -> Response:
        return _json({"object": "list", "data": [_card(info) for info in core.describe_all()]})

    @app.get("/v1/models/{model}", response_model=ModelCard, responses=_ERRORS, dependencies=security,
             summary="One served model")
    async def describe_model(model: str) -> Response:
        try:
            return _json(_card(core.describe(model)))
        except ServeError as exc:
            return serve_error_response(exc)

    @app.get("/", include_in_schema=False)
    async def root() -> JSONResponse:
        return JSONResponse({"service": "d2v", "docs": "/docs", "redoc": "/redoc", "openapi": "/openapi.json",
                             "embeddings": "/v1/embeddings", "models": "/v1/models", "health": "/health"})

    @app.get("/health", summary="200 while SERVING (warmed up, workers alive, not draining), else 503")
    async def health() -> JSONResponse:
        up = serving()
        return JSONResponse({"status": "SERVING" if up else "NOT_SERVING"}, status_code=200 if up else 503)

    @app.get("/metrics", summary="Prometheus metrics (the same as on --metrics-port)")
    async def prometheus() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return app
