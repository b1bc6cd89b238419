"""Server configuration: one dataclass; every field is a flag (--max-batch-size) and an env var (D2V_MAX_BATCH_SIZE).

Precedence: flag > environment variable > default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .console import add_version

ENV_PREFIX = "D2V_"
PILLOW_PIXEL_CAP = 178_956_970  # 2 x PIL.Image.MAX_IMAGE_PIXELS: pillow refuses larger images itself
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass
class ServerConfig:
    # where and what
    models: str = field(default="", metadata={"help": "directory of *.onnx model files (default: the bundled demo "
                                                       "models)"})
    host: str = field(default="[::]", metadata={"help": "address to bind"})
    port: int = field(default=50051, metadata={"help": "gRPC port (0 picks a free one)"})
    http_port: int = field(default=8080, metadata={"help": "HTTP/JSON port: OpenAI-compatible /v1/embeddings, "
                                                            "/v1/embed, /v1/models, /health, /metrics (0: off)"})
    metrics_port: int = field(default=9090, metadata={"help": "Prometheus /metrics port (0: off)"})
    metrics_host: str = field(default="", metadata={"help": "address the /metrics port binds (default: --host)"})
    # runtime
    device: str = field(default="auto", metadata={"help": "auto (CUDA when it really is active, else CPU), cuda or "
                                                           "cpu", "choices": ("auto", "cuda", "cpu")})
    intra_op_threads: int = field(default=0, metadata={"help": "ORT intra-op threads per session (0: the CPU cores "
                                                                "split among the sessions)"})
    gpu_mem_limit_gb: float = field(default=0.0, metadata={"help": "CUDA arena limit per session in GiB (0: 90%% of "
                                                                    "the GPU split among the sessions)"})
    preprocess_workers: int = field(default=0, metadata={"help": "threads decoding/tokenizing inputs (0: "
                                                                  "min(8, cores))"})
    warmup: bool = field(default=True, metadata={"help": "run each model on a few batch shapes before serving"})
    # batching
    max_batch_size: int = field(default=64, metadata={"help": "most inputs in one model run"})
    max_batch_tokens: int = field(default=16384, metadata={"help": "text: padded tokens per batch (n x longest, "
                                                                    "attention's share added for long inputs)"})
    max_batch_audio_seconds: float = field(default=240.0, metadata={"help": "audio: padded seconds per batch"})
    max_batch_pixels: int = field(default=32 * 224 * 224, metadata={"help": "image: pixels per batch"})
    max_delay_ms: float = field(default=2.0, metadata={"help": "a batch that is not full waits at most this long "
                                                                "for inputs known to be on their way"})
    max_padding: float = field(default=0.10, metadata={"help": "most of a batch's work spent on padding: a "
                                                                "neighbour joins only while the batch stays within"})
    batch_fill_gflop: float = field(default=-1.0, metadata={"help": "a batch stops growing once it computes this "
                                                                     "many GFLOP: on CPU a base model is "
                                                                     "compute-bound beyond a few hundred positions, "
                                                                     "so small tight batches lose nothing (0: fill "
                                                                     "to the budget; -1: 40 on CPU, about 240 "
                                                                     "positions of a base model, 0 on CUDA)"})
    sort_window: int = field(default=2048, metadata={"help": "the oldest queued inputs a batch is formed from, by "
                                                              "length (default: a full --max-queue)"})
    max_queue: int = field(default=2048, metadata={"help": "inputs admitted per model (preprocessing or queued); "
                                                            "beyond: RESOURCE_EXHAUSTED"})
    length_buckets: int = field(default=-1, metadata={"help": "batch lengths (tokens, samples) round up to one of N "
                                                               "lengths per doubling: at most 1/N padding, a bounded "
                                                               "number of shapes (0: exact; -1: 8 on CUDA, 0 on CPU)"})
    # request limits
    max_chunked_audio_seconds: float = field(default=3600.0, metadata={"help": "longest audio input with chunking, "
                                                                              "from its header before decoding"})
    max_chunked_tokens: int = field(default=32768, metadata={"help": "longest text input with chunking, in tokens "
                                                                      "(its characters are checked first, before "
                                                                      "tokenizing)"})
    max_request_inputs: int = field(default=512, metadata={"help": "inputs in one request"})
    max_audio_seconds: float = field(default=120.0, metadata={"help": "longest audio input, from its header before "
                                                                       "decoding (longer: INVALID_ARGUMENT, or cut "
                                                                       "with truncate)"})
    max_image_pixels: int = field(default=40_000_000, metadata={"help": "largest image, width x height from its "
                                                                         "header before decoding (larger: "
                                                                         "INVALID_ARGUMENT; pillow caps it at "
                                                                         f"{PILLOW_PIXEL_CAP})"})
    max_text_chars: int = field(default=0, metadata={"help": "longest text in characters, checked before "
                                                              "tokenizing (longer: INVALID_ARGUMENT, or cut with "
                                                              "truncate; 0: 32 x the model's max tokens)"})
    max_preprocess_mb: int = field(default=512, metadata={"help": "MiB of received input being decoded at once "
                                                                   "(more waits; a larger request runs alone)"})
    stream_window: int = field(default=256, metadata={"help": "EmbedStream requests in flight per stream"})
    max_message_mb: int = field(default=256, metadata={"help": "largest gRPC message, in MiB, each way, and largest "
                                                                "HTTP request body (beyond: 413)"})
    http_timeout_s: float = field(default=60.0, metadata={"help": "deadline of an HTTP embed call (a client may ask "
                                                                   "for less with X-D2V-Timeout-S; 0: none)"})
    max_concurrent_rpcs: int = field(default=1024, metadata={"help": "RPCs (calls and open streams) handled at "
                                                                     "once; beyond: RESOURCE_EXHAUSTED (0: no "
                                                                     "limit)"})
    max_streams_per_connection: int = field(default=128, metadata={"help": "concurrent HTTP/2 streams one client "
                                                                            "connection may open"})
    # connections and lifecycle
    keepalive_time_s: float = field(default=60.0, metadata={"help": "server keepalive ping interval"})
    keepalive_timeout_s: float = field(default=20.0, metadata={"help": "keepalive ping ack timeout"})
    max_connection_age_s: float = field(default=600.0, metadata={"help": "close connections this old so clients "
                                                                          "rebalance (0: never)"})
    max_connection_age_grace_s: float = field(default=30.0, metadata={"help": "grace for calls on an aged "
                                                                               "connection"})
    watch_models: float = field(default=0.0, metadata={"help": "re-read --models every this many seconds, as "
                                                               "SIGHUP does (0: only on SIGHUP)"})
    shutdown_grace_s: float = field(default=30.0, metadata={"help": "on SIGTERM, time given to in-flight calls"})
    # security
    auth_token: str = field(default="", metadata={"help": "require 'authorization: Bearer TOKEN' (health and "
                                                           "reflection exempt)", "secret": True})
    auth_token_file: str = field(default="", metadata={"help": "read the bearer token from this file"})
    tls_cert: str = field(default="", metadata={"help": "PEM certificate chain: serve TLS"})
    tls_key: str = field(default="", metadata={"help": "PEM private key for --tls-cert"})
    tls_client_ca: str = field(default="", metadata={"help": "PEM CA bundle: require client certificates (mTLS)"})
    # logs
    log_level: str = field(default="info", metadata={"help": "debug, info, warning, error",
                                                      "choices": ("debug", "info", "warning", "error")})
    log_format: str = field(default="json", metadata={"help": "json (one object per line) or text",
                                                       "choices": ("json", "text")})
    # traces (the otel extra)
    otlp_endpoint: str = field(default="", metadata={"help": "OTLP/HTTP collector to send traces to, e.g. "
                                                             "http://otel-collector:4318 (default: the standard "
                                                             "OTEL_EXPORTER_OTLP_ENDPOINT; unset: no tracing)"})
    otlp_service_name: str = field(default="", metadata={"help": "service.name of the traces (default: "
                                                                 "OTEL_SERVICE_NAME, else d2v-serve)"})

    def validate(self) -> None:
        """Raise ValueError (one line) on inconsistent settings."""
        positive = ("max_batch_size", "max_batch_tokens", "max_batch_audio_seconds", "max_batch_pixels",
                    "sort_window", "max_queue", "max_request_inputs",
                    "max_audio_seconds", "max_image_pixels", "max_preprocess_mb", "stream_window", "max_message_mb",
                    "max_streams_per_connection")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ("length_buckets", "batch_fill_gflop"):
            if getattr(self, name) < -1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= -1, got {getattr(self, name)}")
        for name in ("max_chunked_audio_seconds", "max_chunked_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.max_padding < 1.0:
            raise ValueError(f"--max-padding must be in [0, 1), got {self.max_padding}")
        nonneg = ("port", "http_port", "metrics_port", "intra_op_threads", "gpu_mem_limit_gb", "preprocess_workers",
                  "http_timeout_s", "max_delay_ms", "max_concurrent_rpcs", "max_text_chars", "keepalive_time_s",
                  "keepalive_timeout_s",
                  "max_connection_age_s", "max_connection_age_grace_s", "shutdown_grace_s", "watch_models")
        for name in nonneg:
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.max_image_pixels > PILLOW_PIXEL_CAP:
            raise ValueError(f"--max-image-pixels must be <= {PILLOW_PIXEL_CAP} (pillow's decompression-bomb limit), "
                             f"got {self.max_image_pixels}")
        if self.max_request_inputs > self.max_queue:
            raise ValueError(f"--max-request-inputs ({self.max_request_inputs}) cannot exceed --max-queue "
                             f"({self.max_queue})")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        if self.auth_token and self.auth_token_file:
            raise ValueError("give --auth-token or --auth-token-file, not both")

    def bearer_token(self) -> str:
        """The configured token ('' when auth is off); --auth-token-file is read here."""
        if self.auth_token_file:
            token = Path(self.auth_token_file).read_text().strip()
            if not token:
                raise ValueError(f"--auth-token-file {self.auth_token_file} is empty")
            return token
        return self.auth_token

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict for the start-up log, secrets masked."""
        return {f.name: ("***" if f.metadata.get("secret") and getattr(self, f.name) else getattr(self, f.name))
                for f in fields(self)}


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _env_default(f: Any, env: Mapping[str, str]) -> Any:
    raw = env.get(env_name(f.name))
    if raw is None:
        return f.default
    try:
        value = _parse_bool(raw) if f.type == "bool" else {"int": int, "float": float, "str": str}[f.type](raw)
    except ValueError:
        raise ValueError(f"{env_name(f.name)}={raw!r} is not a valid {f.type}") from None
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ValueError(f"{env_name(f.name)}={raw!r}: expected one of {', '.join(choices)}")
    return value


def add_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None) -> None:
    """One flag per ServerConfig field, defaulting to its D2V_* environment variable."""
    env = os.environ if env is None else env
    for f in fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        default = _env_default(f, env)
        shown = "***" if f.metadata.get("secret") and default else default
        help_text = f"{f.metadata['help']} [env {env_name(f.name)}; default {shown}]"
        if f.type == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            parser.add_argument(flag, dest=f.name, type=kind, default=default, help=help_text,
                                choices=f.metadata.get("choices"))


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    cfg = ServerConfig(**{f.name: getattr(args, f.name) for f in fields(ServerConfig)})
    cfg.validate()
    return cfg


def parse_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> ServerConfig:
    """ServerConfig from flags and D2V_* variables (argparse exits with usage on a bad flag)."""
    parser = argparse.ArgumentParser(prog="d2v-serve", description="Serve d2v ONNX models over gRPC and HTTP/JSON.")
    add_arguments(parser, env)
    add_version(parser)
    return config_from_args(parser.parse_args(argv))
