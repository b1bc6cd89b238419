"""uvicorn serving the HTTP app inside d2v-serve's own event loop, on a socket bound here, with the gRPC TLS files."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

from ..config import ServerConfig

log = logging.getLogger(__name__)


class _EmbeddedUvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # d2v-serve owns SIGTERM/SIGINT and drains both transports itself


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket; `[::]`, `::`, `0.0.0.0` and '' take IPv4 and IPv6 (as gRPC does)."""
    host = host.strip("[]")
    if host in ("", "::", "0.0.0.0"):
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        address: tuple = ("::", port)
    else:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen for HTTP on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


class HttpServer:
    """`await start()` listens and serves in the running loop; `await stop(timeout)` closes it."""

    def __init__(self, app: ASGIApp, config: ServerConfig) -> None:
        self._socket = bind(config.host, config.http_port)
        self.port = self._socket.getsockname()[1]
        self.tls = bool(config.tls_cert)
        settings = uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off", ws="none", server_header=False, proxy_headers=False,
            timeout_graceful_shutdown=max(1, int(config.shutdown_grace_s)),
            limit_concurrency=config.max_concurrent_rpcs or None,
            ssl_certfile=config.tls_cert or None, ssl_keyfile=config.tls_key or None,
            ssl_ca_certs=config.tls_client_ca or None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if config.tls_client_ca else ssl.CERT_NONE,
        )
        self._server = _EmbeddedUvicorn(settings)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]), name="d2v-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # surfaces the start-up error
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.005)

    async def stop(self, timeout: float) -> None:
        """Stop accepting, let open connections finish their responses (at most `timeout` s), close."""
        if self._task is None:
            self._socket.close()
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except (TimeoutError, asyncio.TimeoutError):
            self._server.force_exit = True
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(self._task, 1.0)
