"""`d2v-healthcheck`: a grpc.health.v1 health check for container HEALTHCHECKs and exec probes.

Exits 0 when the server answers SERVING for the service, 1 otherwise (NOT_SERVING, unknown service, no health
service, unreachable, timed out), 2 on bad arguments. Success prints one line on stdout; failure one line on
stderr saying why. Imports only grpc and its health stubs, so it starts fast inside the serving image.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .console import add_version

DEFAULT_TARGET = "localhost:50051"
TARGET_ENV = "D2V_PROBE_TARGET"

SERVING = health_pb2.HealthCheckResponse.SERVING


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="d2v-healthcheck",
        description="Check a gRPC server's grpc.health.v1 status: exit 0 when SERVING, 1 otherwise.",
    )
    p.add_argument(
        "--target",
        default=os.environ.get(TARGET_ENV) or DEFAULT_TARGET,
        help=f"host:port of the server (default: ${TARGET_ENV} or {DEFAULT_TARGET})",
    )
    p.add_argument("--service", default="", help="service name to check (default: '' = the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default: 3)")
    tls = p.add_argument_group("TLS (when the server runs with TLS or mTLS)")
    tls.add_argument("--tls", action="store_true", help="connect with TLS")
    tls.add_argument("--ca-cert", type=Path, help="PEM roots to verify the server with (default: system roots)")
    tls.add_argument("--client-cert", type=Path, help="PEM client certificate, for mTLS")
    tls.add_argument("--client-key", type=Path, help="PEM client key, for mTLS")
    tls.add_argument("--server-name", help="name to verify the server certificate against (default: target host)")
    add_version(p)
    return p


def _channel(args: argparse.Namespace) -> grpc.Channel:
    # A probe of a local server must never go through an HTTP proxy set in the environment.
    options: list[tuple[str, str | int]] = [("grpc.enable_http_proxy", 0)]
    if not args.tls:
        return grpc.insecure_channel(args.target, options=options)
    if args.server_name:
        options.append(("grpc.ssl_target_name_override", args.server_name))
    creds = grpc.ssl_channel_credentials(
        root_certificates=args.ca_cert.read_bytes() if args.ca_cert else None,
        private_key=args.client_key.read_bytes() if args.client_key else None,
        certificate_chain=args.client_cert.read_bytes() if args.client_cert else None,
    )
    return grpc.secure_channel(args.target, creds, options=options)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def check(args: argparse.Namespace) -> tuple[bool, str]:
    """Ask the server once; return (serving, one-line reason)."""
    where = f"{args.target} service={args.service!r}"
    with _channel(args) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as e:
            code = e.code()
            if code == grpc.StatusCode.NOT_FOUND:
                return False, f"{where}: unknown service (NOT_FOUND)"
            if code == grpc.StatusCode.UNIMPLEMENTED:
                return False, f"{where}: server has no grpc.health.v1 health service (UNIMPLEMENTED)"
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return False, f"{where}: no answer within {args.timeout:g}s (DEADLINE_EXCEEDED)"
            if code == grpc.StatusCode.UNAVAILABLE:
                return False, f"{where}: unreachable (UNAVAILABLE: {_one_line(e.details() or '')})"
            return False, f"{where}: {code.name}: {_one_line(e.details() or '')}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == SERVING, f"{where}: {status}"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.timeout <= 0:
        print("d2v-healthcheck: --timeout must be > 0", file=sys.stderr)
        return 2
    if bool(args.client_cert) != bool(args.client_key):
        print("d2v-healthcheck: --client-cert and --client-key go together", file=sys.stderr)
        return 2
    try:
        ok, reason = check(args)
    except OSError as e:  # unreadable certificate files
        ok, reason = False, f"{args.target}: {_one_line(str(e))}"
    print(f"d2v-healthcheck: {reason}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
