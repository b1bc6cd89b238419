"""The engines that embed a bulk job's batches: the server's own core in-process, or a running server over
EmbedStream. Both yield, per batch and in order, one outcome per input: (vector, positions) or a Failure with the
server's status and one-line reason. A bad input fails alone (the rest of its batch is embedded again without it); a
failure of the service itself (unavailable, unauthenticated, ...) stops the job with `JobFailed`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import json
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from ..backend.runner import cpu_cores
from ..client import Audio, Client, EmbedError, Image, from_tensor, options, to_input
from ..config import ServerConfig
from ..core.engine import EmbeddingCore
from ..core.request import EmbedOptions, EmbedRequest, Input
from ..errors import ServeError
from ..models.registry import load_model, runtime_settings, start_worker
from .sources import Failure

Outcome = tuple[np.ndarray, int] | Failure
EmbedOnce = Callable[[list[Input]], list[tuple[np.ndarray, int]]]

# Statuses about the service, not an input: the job stops (and resumes later) instead of recording them per input.
_FATAL = {"UNAVAILABLE", "UNAUTHENTICATED", "PERMISSION_DENIED", "DEADLINE_EXCEEDED", "CANCELLED",
          "RESOURCE_EXHAUSTED", "NOT_FOUND", "UNKNOWN", "UNIMPLEMENTED"}
_INPUT_PREFIX = re.compile(r"^input \d+: ")
_CODES = {status.value[0]: status for status in grpc.StatusCode}


class JobFailed(RuntimeError):
    """The job cannot go on (one line); the shards written so far stay, and the job resumes from them."""


class Isolation:
    """Runs batches through an engine's `embed_once` so that each bad input fails alone.

    An error that names an input fails that input and the rest run again; one that names none is a refusal of the
    request as a whole (e.g. an answer over the message limit), so each input runs alone. Until some input has been
    embedded such a refusal of a single input is taken as a refusal of the job's options (a chunking window the model
    cannot take), and stops the job."""

    def __init__(self) -> None:
        self.succeeded = threading.Event()

    def run(self, embed_once: EmbedOnce, inputs: Sequence[Input]) -> list[Outcome]:
        out: list[Outcome | None] = [None] * len(inputs)
        todo = list(range(len(inputs)))
        while todo:
            try:
                results = embed_once([inputs[i] for i in todo])
            except (ServeError, EmbedError) as exc:
                code = exc.code.name
                if code in _FATAL:
                    raise JobFailed(f"{code}: {exc.message}") from None
                if 0 <= exc.input_index < len(todo):
                    out[todo.pop(exc.input_index)] = Failure(code, _INPUT_PREFIX.sub("", exc.message))
                    continue
                if len(todo) > 1:
                    for i in todo:
                        out[i] = self.run(embed_once, [inputs[i]])[0]
                    break
                if not self.succeeded.is_set():
                    raise JobFailed(f"{code}: {exc.message}") from None
                out[todo[0]] = Failure(code, exc.message)
                break
            self.succeeded.set()
            for i, result in zip(todo, results, strict=True):
                out[i] = result
            break
        return out  # type: ignore[return-value] - every slot is filled


def options_dict(opts: EmbedOptions) -> dict[str, Any]:
    c = opts.chunking
    return {"representation": opts.representation, "pooling": opts.pooling, "normalize": opts.normalize,
            "dtype": opts.dtype, "truncate": opts.truncate,
            "chunking": {"enabled": c.enabled, "window": c.window, "overlap": c.overlap}}


class LocalEngine:
    """The server's core (preprocessing pool, batcher, ORT runner) in this process, with no transport: what the
    gRPC and HTTP front ends call, called directly. `window` calls are in flight at once (the read-ahead; default:
    enough batches of `batch_size` to fill the core's queue, --max-queue inputs, so that the batcher sorts as deep a
    window as in a busy server)."""

    def __init__(self, model_path: str | Path, opts: EmbedOptions, *, batch_size: int = 64, window: int = 0,
                 config: ServerConfig | None = None) -> None:
        self.path = Path(model_path)
        self.options = opts
        self.config = config or ServerConfig(http_port=0, metrics_port=0)
        self.window = window or max(2, self.config.max_queue // batch_size)
        self.model = load_model(self.path, self.config, runtime_settings(self.config, 1))
        self.modality = self.model.modality
        self.hidden_size = self.model.meta.hidden_size
        self.identity = {"name": self.model.name, "sha256": self.model.sha256}
        self.isolation = Isolation()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="d2v-bulk-loop", daemon=True)
        self._thread.start()
        workers = self.config.preprocess_workers or min(8, cpu_cores())
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="d2v-pre")
        self.core = EmbeddingCore({self.model.name: self.model}, self._pool, self.config)
        start_worker(self.model, self.config).result()

    def embed_once(self, inputs: list[Input]) -> list[tuple[np.ndarray, int]]:
        request = EmbedRequest(inputs, self.model.name, self.options)
        call = self.core.serve(request, timeout=None, wait=True, method="Bulk")
        result = asyncio.run_coroutine_threadsafe(call, self._loop).result()
        return [(e.value, e.positions) for e in result.embeddings]

    def embed_batches(self, batches: Iterable[list[Input]]) -> Iterator[list[Outcome]]:
        with concurrent.futures.ThreadPoolExecutor(self.window, thread_name_prefix="d2v-bulk") as callers:
            pending: collections.deque[concurrent.futures.Future] = collections.deque()
            try:
                for inputs in batches:
                    pending.append(callers.submit(self.isolation.run, self.embed_once, inputs))
                    while len(pending) >= self.window:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for f in pending:
                    f.cancel()

    def close(self) -> None:
        if self.model.batcher is not None:
            self.model.batcher.close(10.0)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def _client_input(inp: Input) -> str | Audio | Image:
    if inp.kind == "text":
        return inp.value  # type: ignore[return-value] - a text input holds a str
    return Audio(inp.value) if inp.kind == "audio" else Image(inp.value)  # type: ignore[arg-type]


class ServerEngine:
    """A model on a running d2v server, over one EmbedStream per job with the project's client (the server's stream
    window is the read-ahead); a message that fails for one input runs again without it, over unary Embed."""

    def __init__(self, client: Client, model: str, opts: EmbedOptions) -> None:
        self.client = client
        self.options = opts
        info = client.describe_model(model)
        self.model_name = info["name"]
        self.modality = info["modality"]
        self.hidden_size = int(info["hidden_size"])
        metadata = json.dumps(info["metadata"], sort_keys=True).encode()
        self.identity = {"name": self.model_name, "metadata_sha256": hashlib.sha256(metadata).hexdigest()}
        c = opts.chunking
        self._options = options(opts.pooling, opts.normalize, opts.representation, opts.dtype, opts.truncate,
                                c.enabled, c.window, c.overlap)
        self.isolation = Isolation()

    def _request(self, inputs: list[Input]) -> Any:
        from .._proto.d2v.v1 import embedder_pb2 as pb

        return pb.EmbedRequest(model=self.model_name, inputs=[to_input(_client_input(x)) for x in inputs],
                               options=self._options)

    def embed_once(self, inputs: list[Input]) -> list[tuple[np.ndarray, int]]:
        response = self.client.embed_request(self._request(inputs))
        return [(from_tensor(e.tensor), e.positions) for e in response.embeddings]

    def embed_batches(self, batches: Iterable[list[Input]]) -> Iterator[list[Outcome]]:
        sent: collections.deque[list[Input]] = collections.deque()

        def requests() -> Iterator[Any]:
            for inputs in batches:
                sent.append(inputs)
                if inputs:
                    yield self._request(inputs)

        stream = self.client.stub.EmbedStream(requests(), metadata=self.client._metadata)
        try:
            for response in stream:
                while not sent[0]:  # a batch with no readable input was not sent
                    sent.popleft()
                    yield []
                inputs = sent.popleft()
                if response.HasField("error"):
                    e = response.error
                    error = EmbedError(_CODES.get(e.code, grpc.StatusCode.UNKNOWN), e.message, e.input_index)
                    yield self.isolation.run(self._replay(error), inputs)
                else:
                    self.isolation.succeeded.set()
                    yield [(from_tensor(x.tensor), x.positions) for x in response.embeddings]
        except grpc.RpcError as exc:
            raise JobFailed(f"{exc.code().name}: {exc.details()}") from None
        finally:
            stream.cancel()
        while sent:
            sent.popleft()
            yield []

    def _replay(self, error: EmbedError) -> EmbedOnce:
        """`embed_once`, whose first call (the whole message) raises the stream's answer instead of sending it
        again."""
        pending = [error]

        def embed(inputs: list[Input]) -> list[tuple[np.ndarray, int]]:
            if pending:
                raise pending.pop()
            return self.embed_once(inputs)

        return embed

    def close(self) -> None:
        self.client.close()
