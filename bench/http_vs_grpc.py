"""HTTP (OpenAI-compatible /v1/embeddings) against gRPC (Embed) on one d2v-serve at the same load, in one run.

    .venv/bin/python -m bench.http_vs_grpc [--model-file d2v_serve/demo_models/demo-text.onnx] \
        [--workload text-12] [--concurrency 32] [--duration 10] [--rounds 3]

One server with both transports on; bench/loadgen.py, in its own process, drives one transport at a time with
`--concurrency` closed-loop clients (one distinct input per call), alternating gRPC and HTTP for `--rounds` rounds
so that drift on a shared machine hits both alike. Prints every round and the ratio of the median rates (HTTP /
gRPC) as one JSON object, then a markdown line for docs/benchmarks.md. With it, the CPU time per call of the
server process and of the load generator: on a machine this small the client's share decides the rates as much as
the server's, and the server's CPU per call says what it would do with the cores to itself. The default model is
the bundled demo text model, whose model run is cheap: the transports' per-call cost weighs the most there.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

from bench import report  # noqa: E402
from bench.server import D2vServer, run_loadgen  # noqa: E402
from bench.workloads import WORKLOADS  # noqa: E402

DEMO_TEXT = ROOT / "d2v_serve" / "demo_models" / "demo-text.onnx"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # finished children: each load generator once it exits
    return usage.ru_utime + usage.ru_stime


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.http_vs_grpc", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-file", type=Path, default=DEMO_TEXT, help="a d2v text model file")
    p.add_argument("--workload", default="text-12", choices=sorted(w for w, v in WORKLOADS.items()
                                                                   if v.modality == "text"))
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=3, help="gRPC then HTTP, this many times")
    p.add_argument("--server-args", default="", help="extra d2v-serve flags")
    p.add_argument("--write-docs", action="store_true", help="write the medians' table into docs/benchmarks.md")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.model_file.is_file() or args.rounds < 1 or args.concurrency < 1:
        print("bench.http_vs_grpc: --model-file must exist, --rounds and --concurrency >= 1", file=sys.stderr)
        return 2
    if args.write_docs:
        report.check_doc_sections(["http_vs_grpc"])
    model = args.model_file.stem
    runs: list[dict[str, Any]] = []
    with D2vServer([args.model_file], args.server_args.split()) as server:
        targets = {"grpc": (server.target, False), "http": (f"{server.http_url}/v1/embeddings", True)}
        for round_ in range(args.rounds):
            for transport, (target, http) in targets.items():
                server_cpu, client_cpu = cpu_seconds(server.proc.pid), children_cpu_seconds()
                result = run_loadgen(target, model, args.model_file, args.workload, args.concurrency, args.duration,
                                     args.warmup, http=http)
                if result["errors"]:
                    raise SystemExit(f"bench.http_vs_grpc: {transport} calls failed: {result['errors']}")
                calls = max(1, result["calls"])
                runs.append({"round": round_, "transport": transport, "items_per_s": result["items_per_s"],
                             "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
                             "server_cpu_ms_per_call": round(1000 * (cpu_seconds(server.proc.pid) - server_cpu) / calls,
                                                             3),
                             "client_cpu_ms_per_call": round(1000 * (children_cpu_seconds() - client_cpu) / calls, 3)})
                print(json.dumps(runs[-1]), file=sys.stderr)
    def median(transport: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["transport"] == transport)

    rate = {t: median(t, "items_per_s") for t in targets}
    server_ms = {t: median(t, "server_cpu_ms_per_call") for t in targets}
    client_ms = {t: median(t, "client_cpu_ms_per_call") for t in targets}
    summary = {"model": model, "workload": args.workload, "concurrency": args.concurrency,
               "duration_s": args.duration, "rounds": args.rounds,
               "items_per_s": rate, "http_over_grpc": round(rate["http"] / rate["grpc"], 3),
               "server_cpu_ms_per_call": server_ms, "client_cpu_ms_per_call": client_ms,
               # what the server alone could do per CPU second, HTTP against gRPC
               "server_capacity_http_over_grpc": round(server_ms["grpc"] / server_ms["http"], 3), "runs": runs}
    print(json.dumps(summary))
    print(f"| {model} | {args.workload} | {args.concurrency} | {rate['grpc']:.0f} | {rate['http']:.0f} | "
          f"{rate['http'] / rate['grpc']:.2f} | {server_ms['grpc']:.2f} | {server_ms['http']:.2f} | "
          f"{client_ms['grpc']:.2f} | {client_ms['http']:.2f} |")
    if args.write_docs:
        report.write_doc_sections({"http_vs_grpc": report.markdown_table(
            ["transport", "items/s", "server CPU per call", "load generator CPU per call"],
            [["gRPC `Embed`", f"{rate['grpc']:.0f}", f"{server_ms['grpc']:.2f} ms", f"{client_ms['grpc']:.2f} ms"],
             ["HTTP `/v1/embeddings`", f"{rate['http']:.0f}", f"{server_ms['http']:.2f} ms",
              f"{client_ms['http']:.2f} ms"],
             ["**HTTP / gRPC**", f"**{rate['http'] / rate['grpc']:.2f}**",
              f"{server_ms['http'] / server_ms['grpc']:.2f}", f"{client_ms['http'] / client_ms['grpc']:.2f}"]])})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
