"""d2v-healthcheck against real in-process gRPC servers: SERVING, NOT_SERVING, unknown service, unreachable, TLS."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from d2v_serve import healthcheck
from tests.serve_fixtures import self_signed

REPO = Path(__file__).resolve().parents[1]
Status = health_pb2.HealthCheckResponse


def _start(health_servicer: health.HealthServicer | None, creds: grpc.ServerCredentials | None = None) -> tuple:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    if health_servicer is not None:
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    addr = "127.0.0.1:0"
    port = server.add_secure_port(addr, creds) if creds else server.add_insecure_port(addr)
    server.start()
    return server, port


@pytest.fixture
def servicer() -> health.HealthServicer:
    return health.HealthServicer()


@pytest.fixture
def target(servicer: health.HealthServicer) -> Iterator[str]:
    server, port = _start(servicer)
    yield f"127.0.0.1:{port}"
    server.stop(None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serving_exits_0(target: str, servicer: health.HealthServicer, capsys: pytest.CaptureFixture) -> None:
    servicer.set("", Status.SERVING)
    assert healthcheck.main(["--target", target]) == 0
    out, err = capsys.readouterr()
    assert "SERVING" in out and err == ""


def test_not_serving_exits_1_with_reason(
    target: str, servicer: health.HealthServicer, capsys: pytest.CaptureFixture
) -> None:
    servicer.set("", Status.NOT_SERVING)
    assert healthcheck.main(["--target", target]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and "NOT_SERVING" in err and target in err


def test_named_service(target: str, servicer: health.HealthServicer, capsys: pytest.CaptureFixture) -> None:
    servicer.set("", Status.NOT_SERVING)
    servicer.set("d2v.v1.Embedder", Status.SERVING)
    assert healthcheck.main(["--target", target, "--service", "d2v.v1.Embedder"]) == 0
    servicer.set("d2v.v1.Embedder", Status.NOT_SERVING)
    assert healthcheck.main(["--target", target, "--service", "d2v.v1.Embedder"]) == 1
    assert "NOT_SERVING" in capsys.readouterr().err


def test_unknown_service(target: str, servicer: health.HealthServicer, capsys: pytest.CaptureFixture) -> None:
    servicer.set("", Status.SERVING)
    assert healthcheck.main(["--target", target, "--service", "no.such.Service"]) == 1
    err = capsys.readouterr().err
    assert "unknown service" in err and "no.such.Service" in err


def test_unreachable(capsys: pytest.CaptureFixture) -> None:
    target = f"127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    assert healthcheck.main(["--target", target, "--timeout", "5"]) == 1
    assert time.monotonic() - t0 < 4, "a refused connection should fail fast, not wait for the timeout"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unreachable" in err and target in err


def test_silent_peer_times_out(capsys: pytest.CaptureFixture) -> None:
    with socket.socket() as listener:  # accepts TCP, never speaks HTTP/2
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        target = f"127.0.0.1:{listener.getsockname()[1]}"
        t0 = time.monotonic()
        assert healthcheck.main(["--target", target, "--timeout", "0.5"]) == 1
        assert time.monotonic() - t0 < 3
    assert "DEADLINE_EXCEEDED" in capsys.readouterr().err


def test_server_without_health_service(capsys: pytest.CaptureFixture) -> None:
    server, port = _start(None)
    try:
        assert healthcheck.main(["--target", f"127.0.0.1:{port}"]) == 1
    finally:
        server.stop(None)
    assert "UNIMPLEMENTED" in capsys.readouterr().err


def test_target_from_environment(
    target: str, servicer: health.HealthServicer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    servicer.set("", Status.SERVING)
    monkeypatch.setenv(healthcheck.TARGET_ENV, target)
    assert healthcheck.main([]) == 0
    assert target in capsys.readouterr().out


def test_default_target_without_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(healthcheck.TARGET_ENV, raising=False)
    assert healthcheck._parser().parse_args([]).target == "localhost:50051"


@pytest.mark.parametrize(
    "argv", [["--timeout", "0"], ["--tls", "--client-cert", "c.pem"], ["--tls", "--client-key", "k.pem"]]
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    assert healthcheck.main(argv) == 2
    assert capsys.readouterr().err.startswith("d2v-healthcheck: ")


def test_tls_and_mtls(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cert, key = self_signed(tmp_path)
    pair = [(key.read_bytes(), cert.read_bytes())]
    tls = ["--tls", "--ca-cert", str(cert), "--server-name", "d2v.test"]
    servicer = health.HealthServicer()
    servicer.set("", Status.SERVING)

    server, port = _start(servicer, grpc.ssl_server_credentials(pair))
    target = ["--target", f"127.0.0.1:{port}", "--timeout", "2"]
    try:
        assert healthcheck.main(target + tls) == 0
        assert healthcheck.main(target) == 1  # plaintext to a TLS port
        assert healthcheck.main(target + ["--tls", "--ca-cert", str(cert)]) == 1  # certificate is not for 127.0.0.1
        assert healthcheck.main(target + ["--tls", "--ca-cert", str(tmp_path / "missing.pem")]) == 1
    finally:
        server.stop(None)
    capsys.readouterr()

    mtls = grpc.ssl_server_credentials(pair, root_certificates=cert.read_bytes(), require_client_auth=True)
    server, port = _start(servicer, mtls)
    target = ["--target", f"127.0.0.1:{port}", "--timeout", "2"]
    try:
        assert healthcheck.main(target + tls) == 1  # no client certificate
        assert healthcheck.main(target + tls + ["--client-cert", str(cert), "--client-key", str(key)]) == 0
    finally:
        server.stop(None)


def test_healthcheck_module_imports_no_heavy_packages() -> None:
    code = (
        "import sys, d2v_serve.healthcheck\n"
        "heavy = sorted({'torch', 'onnxruntime', 'numpy'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_healthcheck_as_a_process(target: str, servicer: health.HealthServicer) -> None:
    servicer.set("", Status.NOT_SERVING)
    cmd = [sys.executable, "-m", "d2v_serve.healthcheck", "--target", target]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "NOT_SERVING" in r.stderr
    servicer.set("", Status.SERVING)
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
