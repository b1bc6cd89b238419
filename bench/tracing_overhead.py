"""What tracing costs: `d2v-serve` on a text model driven by bench.loadgen, with tracing off, with tracing on
(every call exported over OTLP/HTTP to a collector stand-in this script runs), and optionally a baseline checkout's
server (the code before tracing existed), in interleaved rounds; median items/s of each and the ratios.

    python -m bench.tracing_overhead                                   # demo-text, text-12, 3 rounds
    python -m bench.tracing_overhead --baseline /path/to/older/checkout --rounds 5
"""

from __future__ import annotations

import argparse
import http.server
import json
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from bench import report
from bench.server import D2vServer, run_loadgen
from d2v_serve.cli import DEMO_MODELS


class _Collector(http.server.BaseHTTPRequestHandler):
    """Accepts OTLP/HTTP exports and counts them (a real collector's receive path, minus the storage)."""

    exports = 0

    def do_POST(self) -> None:  # noqa: N802 - the http.server handler name
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).exports += 1
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def baseline_executable(checkout: Path, directory: str) -> str:
    """A d2v-serve that imports d2v_serve from another checkout (same venv, its code first on the path)."""
    wrapper = Path(directory) / "d2v-serve-baseline"
    serve = Path(sys.executable).with_name("d2v-serve")
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{checkout.resolve()}" exec "{serve}" "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.tracing_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEMO_MODELS / "demo-text.onnx")
    p.add_argument("--workload", default="text-12")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline", type=Path, help="an older checkout to measure beside (its d2v_serve is imported)")
    p.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = p.parse_args()
    if args.write_docs:
        report.check_doc_sections(["tracing_overhead"])

    collector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        cases: dict[str, dict] = {"off": {}, "on": {"extra_args": [
            "--otlp-endpoint", f"http://127.0.0.1:{collector.server_port}"]}}
        if args.baseline:
            commit = subprocess.run(["git", "-C", str(args.baseline), "rev-parse", "--short", "HEAD"],
                                    capture_output=True, text=True).stdout.strip()
            label = f"baseline ({commit})" if commit else "baseline"
            cases = {label: {"executable": baseline_executable(args.baseline, tmp)}, **cases}
        rates: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, kwargs in cases.items():
                with D2vServer([args.model], **kwargs) as server:
                    result = run_loadgen(server.target, args.model.stem, args.model, args.workload,
                                         args.concurrency, args.duration, warmup=2.0)
                    assert not result.get("errors"), result.get("errors")
                    rates[name].append(result["items_per_s"])
    collector.shutdown()
    median = {name: statistics.median(r) for name, r in rates.items()}
    print(f"{args.workload} on {args.model.stem}, concurrency {args.concurrency}, {args.rounds} interleaved rounds "
          f"of {args.duration:g} s; OTLP exports received: {_Collector.exports}")
    table = report.markdown_table(
        ["server", "items/s (median)", "rounds", "vs tracing off"],
        [[name, f"{rate:.0f}", ", ".join(f"{r:.0f}" for r in rates[name]), f"{rate / median['off']:.3f}"]
         for name, rate in median.items()])
    print(table)
    print(json.dumps({"rates": rates, "exports": _Collector.exports}))
    if args.write_docs:
        report.write_doc_sections({"tracing_overhead": table})


if __name__ == "__main__":
    main()
