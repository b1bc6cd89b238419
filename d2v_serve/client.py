"""Python client: `Client("host:50051").embed(...)` returns numpy arrays.

Inputs: `str` is text; `bytes` or a path is an encoded file, audio or image told apart by its magic bytes (or
wrap it: `Audio(...)`, `Image(...)`); `Pcm(samples, sample_rate)` sends raw float32/int16 samples.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ._proto.d2v.v1 import embedder_pb2 as pb
from ._proto.d2v.v1 import embedder_pb2_grpc as pb_grpc
from .errors import INPUT_INDEX_KEY
from .media import MEDIA_SUFFIXES
from .transport.tensors import NAMES, from_tensor

POOLING = {"none": pb.POOLING_NONE, "mean": pb.POOLING_MEAN, "cls": pb.POOLING_CLS}
REPRESENTATION = {"last": pb.REPRESENTATION_LAST_LAYER, "target": pb.REPRESENTATION_TARGET}
DTYPE = NAMES  # float32, float16, int8, uint8, binary, ubinary
_MODALITY_NAMES = {pb.MODALITY_AUDIO: "audio", pb.MODALITY_IMAGE: "image", pb.MODALITY_TEXT: "text"}
_CODES = {status.value[0]: status for status in grpc.StatusCode}


@dataclass
class Audio:
    """An encoded audio file (bytes or path)."""
    data: bytes | str | os.PathLike


@dataclass
class Image:
    """An encoded image (bytes or path)."""
    data: bytes | str | os.PathLike


@dataclass
class Pcm:
    """Raw samples: float32 in [-1, 1] or int16; [samples] or [samples, channels]."""
    samples: np.ndarray
    sample_rate: int


InputLike = str | bytes | os.PathLike | Audio | Image | Pcm


class EmbedError(RuntimeError):
    """A failed call: `code` (grpc.StatusCode), the server's one-line `message`, and `input_index` (-1: none)."""

    def __init__(self, code: grpc.StatusCode, message: str, input_index: int = -1) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code, self.message, self.input_index = code, message, input_index


def _read(data: bytes | str | os.PathLike) -> bytes:
    return data if isinstance(data, bytes) else Path(data).read_bytes()


def sniff(data: bytes) -> str:
    """'audio' or 'image' from the first bytes of an encoded file; ValueError when neither."""
    head = data[:16]
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"data:image")) or (
            head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    if head.startswith((b"fLaC", b"OggS", b"ID3", b"FORM", b".snd", b"caff", b"riff")) or (
            head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE") or head[:2] in (b"\xff\xfb", b"\xff\xf3"):
        return "audio"
    raise ValueError("cannot tell whether these bytes are audio or an image: wrap them in Audio(...) or Image(...)")


def file_modality(path: Path, data: bytes) -> str:
    """'audio' or 'image' from a file's suffix, else from its first bytes; ValueError when neither says."""
    suffix = path.suffix.lower()
    if suffix in MEDIA_SUFFIXES["audio"]:
        return "audio"
    if suffix in MEDIA_SUFFIXES["image"]:
        return "image"
    try:
        return sniff(data)
    except ValueError:
        raise ValueError(f"{path}: not an audio or image file (unknown suffix and header)") from None


def _check_not_a_file_name(text: str) -> None:
    """A str is text, a Path is a file. A str that looks like a media file name and names an existing file is refused
    rather than embedded as the words of its name (the CLI reads file arguments, so the mix-up is easy)."""
    if len(text) > 4096 or any(c.isspace() for c in text):
        return
    suffix = Path(text).suffix.lower()
    if (suffix in MEDIA_SUFFIXES["audio"] or suffix in MEDIA_SUFFIXES["image"]) and Path(text).is_file():
        raise ValueError(f"{text!r} names a file, and a str is embedded as text: pass Path({text!r}) to embed the file")


def to_input(x: InputLike) -> pb.Input:
    """One client-side input as the proto Input: a str is text, a path (Path, os.PathLike) or bytes an encoded audio
    or image file. A str that names an existing audio or image file (`"speech.wav"`) raises ValueError."""
    if isinstance(x, str):
        _check_not_a_file_name(x)
        return pb.Input(text=x)
    if isinstance(x, Audio):
        return pb.Input(audio=_read(x.data))
    if isinstance(x, Image):
        return pb.Input(image=_read(x.data))
    if isinstance(x, Pcm):
        samples = np.asarray(x.samples)
        if samples.dtype == np.int16:
            encoding, data = pb.Pcm.ENCODING_INT16, samples.astype("<i2").tobytes()
        else:
            encoding, data = pb.Pcm.ENCODING_FLOAT32, samples.astype("<f4").tobytes()
        channels = 1 if samples.ndim == 1 else samples.shape[1]
        return pb.Input(pcm=pb.Pcm(data=data, encoding=encoding, sample_rate=int(x.sample_rate), channels=channels))
    if isinstance(x, os.PathLike):
        data = _read(x)
        return pb.Input(audio=data) if file_modality(Path(x), data) == "audio" else pb.Input(image=data)
    if isinstance(x, bytes):
        return pb.Input(audio=x) if sniff(x) == "audio" else pb.Input(image=x)
    raise TypeError(f"cannot embed a {type(x).__name__}: use str, bytes, a path, Audio, Image or Pcm")


def options(pooling: str = "mean", normalize: bool = False, representation: str = "last", dtype: str = "float32",
            truncate: bool = False, chunk: bool = False, window: float = 0.0, overlap: float | None = None,
            windows: bool = False) -> pb.EmbedOptions:
    """The request's EmbedOptions. `chunk`: long audio and text in windows of `window` (audio seconds, text tokens;
    0: the model's default) overlapping by `overlap` (None: the default); `windows`: the per-window breakdown."""
    for value, table, name in ((pooling, POOLING, "pooling"), (representation, REPRESENTATION, "representation"),
                               (dtype, DTYPE, "dtype")):
        if value not in table:
            raise ValueError(f"{name} must be one of {', '.join(table)}, got {value!r}")
    if (window or overlap is not None or windows) and not chunk:
        raise ValueError("window, overlap and windows need chunk=True")
    chunking = pb.Chunking(enabled=chunk, window=window, windows=windows)
    if overlap is not None:
        chunking.overlap = overlap
    return pb.EmbedOptions(pooling=POOLING[pooling], normalize=normalize, representation=REPRESENTATION[representation],
                           dtype=DTYPE[dtype], truncate=truncate, chunking=chunking)


def _error(exc: grpc.RpcError) -> EmbedError:
    index = -1
    for key, value in exc.trailing_metadata() or ():
        if key == INPUT_INDEX_KEY:
            index = int(value)
    return EmbedError(exc.code(), exc.details() or "", index)


class Client:
    """A channel to a d2v server. Use as a context manager or call close()."""

    def __init__(self, target: str, *, token: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None, client_cert: tuple[bytes, bytes] | None = None,
                 server_name: str | None = None, timeout: float | None = 60.0, max_message_mb: int = 256) -> None:
        """`client_cert` is (private key PEM, certificate chain PEM) for mTLS; `server_name` overrides the name
        the server's certificate is checked against."""
        opts: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", max_message_mb * 2**20),
            ("grpc.max_send_message_length", max_message_mb * 2**20),
            ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000)]
        if server_name:
            opts.append(("grpc.ssl_target_name_override", server_name))
        if tls or root_certificates or client_cert:
            key, chain = client_cert if client_cert else (None, None)
            creds = grpc.ssl_channel_credentials(root_certificates, key, chain)
            self.channel = grpc.secure_channel(target, creds, options=opts)
        else:
            self.channel = grpc.insecure_channel(target, options=opts)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        self.stub = pb_grpc.EmbedderStub(self.channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def embed_request(self, request: pb.EmbedRequest, timeout: float | None = None) -> pb.EmbedResponse:
        """Send a raw EmbedRequest; raises EmbedError."""
        try:
            return self.stub.Embed(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def embed(self, inputs: InputLike | Sequence[InputLike], model: str = "", *, pooling: str = "mean",
              normalize: bool = False, representation: str = "last", dtype: str = "float32", truncate: bool = False,
              chunk: bool = False, window: float = 0.0, overlap: float | None = None,
              timeout: float | None = None) -> np.ndarray | list[np.ndarray]:
        """Embeddings of one input (an array) or of a list of inputs (a list of arrays, in order).

        Pooled: [hidden] per input; pooling="none": [positions, hidden]. `chunk`: long inputs in overlapping
        windows (`window`, `overlap`: audio seconds, text tokens; defaults from the model), joined into one
        embedding each; `embed_windows` gives the per-window breakdown.
        """
        single = not isinstance(inputs, list | tuple)
        batch = [inputs] if single else list(inputs)
        request = pb.EmbedRequest(model=model, inputs=[to_input(x) for x in batch],
                                  options=options(pooling, normalize, representation, dtype, truncate, chunk, window,
                                                  overlap))
        arrays = [from_tensor(e.tensor) for e in self.embed_request(request, timeout).embeddings]
        return arrays[0] if single else arrays

    def embed_windows(self, x: InputLike, model: str = "", *, window: float = 0.0, overlap: float | None = None,
                      timeout: float | None = None, **opts: Any) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """One input chunked: its joined embedding and its windows (start, end, positions, kept_start, kept_end,
        and `embedding`, the window's output alone)."""
        request = pb.EmbedRequest(model=model, inputs=[to_input(x)],
                                  options=options(**opts, chunk=True, window=window, overlap=overlap, windows=True))
        embedding = self.embed_request(request, timeout).embeddings[0]
        windows = [{"start": w.start, "end": w.end, "positions": w.positions, "kept_start": w.kept_start,
                    "kept_end": w.kept_end, "embedding": from_tensor(w.tensor)} for w in embedding.windows]
        return from_tensor(embedding.tensor), windows

    def embed_stream(self, inputs: Iterable[InputLike], model: str = "", *, batch_size: int = 16,
                     timeout: float | None = None, **opts: Any) -> Iterator[np.ndarray]:
        """Embeddings of many inputs over one EmbedStream, `batch_size` inputs per message, yielded in order.

        Raises EmbedError (with the input's global index) at the first input that failed.
        """
        embed_options = options(**opts)

        def requests() -> Iterator[pb.EmbedRequest]:
            chunk: list[pb.Input] = []
            sent = 0
            for x in inputs:
                chunk.append(to_input(x))
                if len(chunk) == batch_size:
                    yield pb.EmbedRequest(model=model, inputs=chunk, options=embed_options, request_id=str(sent))
                    sent, chunk = sent + len(chunk), []
            if chunk:
                yield pb.EmbedRequest(model=model, inputs=chunk, options=embed_options, request_id=str(sent))

        try:
            for response in self.stub.EmbedStream(requests(), timeout=timeout, metadata=self._metadata):
                if response.HasField("error"):
                    e = response.error
                    first = int(response.request_id or 0)
                    index = first + e.input_index if e.input_index >= 0 else -1
                    message = e.message if index < 0 else f"input {index}: {e.message.partition(': ')[2]}"
                    raise EmbedError(_CODES.get(e.code, grpc.StatusCode.UNKNOWN), message, index)
                for embedding in response.embeddings:
                    yield from_tensor(embedding.tensor)
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def list_models(self) -> list[dict[str, Any]]:
        """name, modality, hidden_size, ... of every served model."""
        try:
            response = self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return [model_dict(m) for m in response.models]

    def describe_model(self, name: str) -> dict[str, Any]:
        try:
            info = self.stub.DescribeModel(pb.DescribeModelRequest(model=name), timeout=self.timeout,
                                           metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return model_dict(info)

    def health(self, service: str = "") -> str:
        """SERVING, NOT_SERVING, ... of the server ('') or of a service name."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def model_dict(info: pb.ModelInfo) -> dict[str, Any]:
    return {
        "name": info.name, "modality": _MODALITY_NAMES.get(info.modality, "unknown"),
        "hidden_size": info.hidden_size, "num_layers": info.num_layers, "precision": info.precision,
        "representations": ["last" if r == pb.REPRESENTATION_LAST_LAYER else "target" for r in info.representations],
        "execution_provider": info.execution_provider, "ready": info.ready, "max_tokens": info.max_tokens,
        "max_audio_seconds": info.max_audio_seconds, "image_size": info.image_size, "sample_rate": info.sample_rate,
        "file": info.file, "metadata": json.loads(info.metadata_json) if info.metadata_json else {},
        "chunk_window": info.chunk_window, "chunk_overlap": info.chunk_overlap,
        "max_chunked_audio_seconds": info.max_chunked_audio_seconds, "max_chunked_tokens": info.max_chunked_tokens,
        "file_sha256": info.file_sha256, "loaded_at": info.loaded_at,
    }
