"""The server: models + batchers + the embedding core, served over gRPC (Embedder, health, reflection) and HTTP/JSON,
plus metrics, and its lifecycle."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from . import metrics
from .backend.runner import cpu_cores
from .config import ServerConfig
from .core.engine import EmbeddingCore
from .models.registry import Model, load_models, start_worker
from .reload import ModelReloader
from .tracing import Tracing, tracing_from_config
from .transport.auth import BearerTokenInterceptor
from .transport.grpc_service import SERVICE_NAME, EmbedderService, add_to_server
from .transport.http_app import create_app
from .transport.http_server import HttpServer
from .transport.reflection import enable_reflection

log = logging.getLogger(__name__)
_CUT_S = 2.0  # after the grace, time for the cut calls to send their UNAVAILABLE
_QUIET_S = 0.25  # before closing the transports, no call arrived for this long (calls racing the drain)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def model_health_name(model: str) -> str:
    """Health service name of one model: `d2v.v1.Embedder/<model>`."""
    return f"{SERVICE_NAME}/{model}"


def grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    ms = 1000
    options = [
        ("grpc.max_receive_message_length", config.max_message_mb * 2**20),
        ("grpc.max_send_message_length", config.max_message_mb * 2**20),
        ("grpc.keepalive_time_ms", int(config.keepalive_time_s * ms)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * ms)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10 * ms),  # clients may ping every 10 s
        ("grpc.http2.max_ping_strikes", 3),
        ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
        ("grpc.max_concurrent_streams", config.max_streams_per_connection),  # HTTP/2 streams per connection
    ]
    if config.max_connection_age_s > 0:
        options += [("grpc.max_connection_age_ms", int(config.max_connection_age_s * ms)),
                    ("grpc.max_connection_age_grace_ms", int(config.max_connection_age_grace_s * ms))]
    return options


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if not config.tls_cert:
        return None
    key, chain = Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes()
    ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=ca, require_client_auth=ca is not None)


class Server:
    """Start with `await start()`, stop with `await stop()`; `run()` does both around SIGTERM/SIGINT."""

    def __init__(self, config: ServerConfig, models_dir: str | Path, tracing: Tracing | None = None) -> None:
        self.config = config
        self.tracing = tracing if tracing is not None else tracing_from_config(config)
        self.models_dir = Path(models_dir)
        self.models: dict[str, Model] = {}
        self.port = 0
        self.http_port = 0  # 0 while HTTP is off
        self.serving = False  # what HTTP /health reports; gRPC health says the same
        self.health = health.aio.HealthServicer()
        self.core: EmbeddingCore | None = None
        self._server: grpc.aio.Server | None = None
        self._http: HttpServer | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self.reloader = ModelReloader(self)

    async def start(self) -> None:
        """Load the models, listen (health NOT_SERVING), warm every model up, then report SERVING."""
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        started = time.monotonic()
        self.models = await asyncio.to_thread(load_models, self.models_dir, cfg)
        workers = cfg.preprocess_workers or min(8, cpu_cores())
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="d2v-pre")
        self.core = EmbeddingCore(self.models, self._pool, cfg, self.tracing)
        for name in ["", SERVICE_NAME, *map(model_health_name, self.models)]:
            await self.health.set(name, NOT_SERVING)

        interceptors = [BearerTokenInterceptor(token)] if (token := cfg.bearer_token()) else []
        server = grpc.aio.server(options=grpc_options(cfg), interceptors=interceptors,
                                 maximum_concurrent_rpcs=cfg.max_concurrent_rpcs or None)
        add_to_server(EmbedderService(self.core), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        enable_reflection([SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name], server)
        address = f"{cfg.host}:{cfg.port}"
        creds = server_credentials(cfg)
        try:
            self.port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
        except RuntimeError:  # grpc.aio: "Failed to bind to address ..."
            self.port = 0
        if not self.port:
            raise OSError(f"cannot listen for gRPC on {address} (port in use? --port picks another)")
        await server.start()
        self._server = server
        if cfg.http_port:
            try:
                self._http = HttpServer(create_app(self.core, cfg, lambda: self.serving), cfg)
            except OSError as exc:
                raise OSError(f"{exc} (--http-port picks another; 0 turns HTTP off)") from None
            self.http_port = self._http.port
            await self._http.start()
        if cfg.metrics_port:
            try:
                metrics.serve_metrics(cfg.metrics_port, cfg.metrics_host or cfg.host)
            except OSError as exc:
                raise OSError(f"cannot serve metrics on port {cfg.metrics_port}: {exc.strerror or exc} "
                              "(--metrics-port picks another; 0 turns it off)") from None
        log.info("listening", extra={"port": self.port, "http_port": self.http_port, "tls": creds is not None,
                                     "auth": bool(interceptors), "models": list(self.models),
                                     "config": cfg.redacted()})

        ready = {name: asyncio.wrap_future(start_worker(m, cfg, self.on_worker_death))
                 for name, m in self.models.items()}
        for name, warmed in ready.items():
            try:
                await warmed
            except Exception as exc:  # noqa: BLE001 - ORT errors derive from Exception only
                raise RuntimeError(f"model {name} failed its warm-up: {' '.join(str(exc).split())[:300]}") from None
        for name in ["", SERVICE_NAME, *map(model_health_name, self.models)]:
            await self.health.set(name, SERVING)
        self.serving = True
        log.info("serving", extra={"port": self.port, "startup_s": round(time.monotonic() - started, 3)})

    def publish(self, models: dict[str, Model]) -> None:
        """Serve `models` from the next call on (a reload's swap: one assignment, seen by every transport)."""
        self.models = models
        if self.core is not None:
            self.core.models = models

    async def set_model_health(self, name: str, serving: bool) -> None:
        await self.health.set(model_health_name(name), SERVING if serving else NOT_SERVING)

    def on_worker_death(self, name: str, exc: BaseException) -> None:
        """From the dead worker's thread: the whole server reports NOT_SERVING (a replica missing a model is
        broken; let the orchestrator replace it)."""
        if self._loop is not None and not self._loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._mark_down(name), self._loop)

    async def _mark_down(self, name: str) -> None:
        self.serving = False
        for service in ["", SERVICE_NAME, model_health_name(name)]:
            await self.health.set(service, NOT_SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: health NOT_SERVING, refuse new calls (UNAVAILABLE), finish in-flight ones, stop."""
        if self._stopping:
            return
        self._stopping = True
        grace = self.config.shutdown_grace_s if grace is None else grace
        deadline = time.monotonic() + grace
        log.info("draining", extra={"grace_s": grace})
        self.serving = False
        await self.health.enter_graceful_shutdown()
        if self.core is not None:
            drain = self.core.drain
            drain.begin()
            if not await drain.wait_idle(grace):
                cut = drain.cut()
                log.warning("grace period over; calls still in flight end UNAVAILABLE", extra={"calls": cut})
                await drain.wait_idle(_CUT_S)
            await drain.wait_quiet(_QUIET_S, max(0.0, min(_QUIET_S * 4, deadline - time.monotonic())))
        left = max(0.0, deadline - time.monotonic())
        await asyncio.gather(*([self._server.stop(left)] if self._server is not None else []),
                             *([self._http.stop(max(1.0, left))] if self._http is not None else []))
        for model in self.models.values():
            if model.batcher is not None:
                await asyncio.to_thread(model.batcher.close, max(1.0, deadline - time.monotonic()))
        await self.reloader.close(max(1.0, deadline - time.monotonic()))  # versions replaced by a reload
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self.tracing.shutdown)  # export the spans still buffered
        log.info("stopped")

    async def run(self) -> int:
        """Serve until SIGTERM or SIGINT, then stop gracefully. Returns the exit code."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reloader.request)
        watch = None
        try:
            await self.start()
            if self.config.watch_models > 0:
                watch = asyncio.create_task(self.reloader.watch(self.config.watch_models))
            await stop.wait()
        finally:
            if watch is not None:
                watch.cancel()
            await self.stop()
        return 0
