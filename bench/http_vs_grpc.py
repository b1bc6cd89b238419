"""HTTP (OpenAI-compatible /v1/embeddings) against gRPC (Embed) on one d2v-serve at the same load, in one run.

    .venv/bin/python -m bench.http_vs_grpc [--model-file d2v_serve/demo_models/demo-text.onnx] \
        [--workload text-12] [--concurrency 32] [--duration 10] [--rounds 3]

One server with both transports on; bench/loadgen.py, in its own process, drives one transport at a time with
`--concurrency` closed-loop clients (one distinct input per call), alternating gRPC and HTTP for `--rounds` rounds
so that drift on a shared machine hits both alike. Prints every round and the ratio of the median rates (HTTP /
gRPC) as one JSON object, then a markdown line for docs/benchmarks.md. The default model is the bundled demo text
model, whose model run is cheap: the transports' per-call cost weighs the most there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.server import D2vServer, run_loadgen  # noqa: E402
from bench.workloads import WORKLOADS  # noqa: E402

DEMO_TEXT = ROOT / "d2v_serve" / "demo_models" / "demo-text.onnx"


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
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.model_file.is_file() or args.rounds < 1 or args.concurrency < 1:
        print("bench.http_vs_grpc: --model-file must exist, --rounds and --concurrency >= 1", file=sys.stderr)
        return 2
    model = args.model_file.stem
    runs: list[dict[str, Any]] = []
    with D2vServer([args.model_file], args.server_args.split()) as server:
        targets = {"grpc": (server.target, False), "http": (f"{server.http_url}/v1/embeddings", True)}
        for round_ in range(args.rounds):
            for transport, (target, http) in targets.items():
                result = run_loadgen(target, model, args.model_file, args.workload, args.concurrency, args.duration,
                                     args.warmup, http=http)
                if result["errors"]:
                    raise SystemExit(f"bench.http_vs_grpc: {transport} calls failed: {result['errors']}")
                runs.append({"round": round_, "transport": transport, "items_per_s": result["items_per_s"],
                             "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"]})
                print(json.dumps(runs[-1]), file=sys.stderr)
    median = {t: statistics.median(r["items_per_s"] for r in runs if r["transport"] == t) for t in targets}
    ratio = median["http"] / median["grpc"]
    summary = {"model": model, "workload": args.workload, "concurrency": args.concurrency,
               "duration_s": args.duration, "rounds": args.rounds, "grpc_items_per_s": round(median["grpc"], 1),
               "http_items_per_s": round(median["http"], 1), "http_over_grpc": round(ratio, 3), "runs": runs}
    print(json.dumps(summary))
    print(f"| {model} | {args.workload} | {args.concurrency} | {median['grpc']:.0f} | {median['http']:.0f} | "
          f"{ratio:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
