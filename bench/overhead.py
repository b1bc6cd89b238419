"""The server's CPU cost per input against raw ONNX Runtime's, the figure a shared machine cannot skew.

    .venv/bin/python -m bench.overhead --models-dir runs/bench-models/base                # text-12, int8, text-128
    .venv/bin/python -m bench.overhead --workloads text-12-int8 --profile runs/overhead   # + a py-spy profile

For each workload it starts `d2v-serve` on the workload's model with one ORT intra-op thread (`--threads`), drives
it with bench/loadgen.py at `--concurrency` closed-loop clients (one input per call, a process of its own) and
reads the server process's CPU seconds (/proc utime + stime) and the inputs it ran (its /metrics) once it is idle
before and after; then it stops the server and runs the same model file with ONNX Runtime directly, on the same
thread count and inputs, at each of `--raw-batches`, counting that process's CPU time. Ratio: raw ORT's CPU per
input at its cheapest batch / the server's CPU per input (1.0: the server adds nothing). The server's CPU is also
split by thread: the model's worker (ORT runs there), the event loop (gRPC, parsing, tokenizing, packing) and the
rest (gRPC's poller and event engine, result delivery). `--rounds` alternates server and raw ORT and keeps the
cheapest of each: a busy neighbour only ever adds CPU time (cache and frequency), never removes it. Wall-clock rates
are printed too, but on a busy machine only the CPU figures compare.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

from bench import engines  # noqa: E402
from bench.workloads import WORKLOADS, parse_workloads  # noqa: E402

DEFAULT_WORKLOADS = "text-12,text-12-int8,text-128"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", type=Path, default=ROOT / "runs" / "bench-models" / "base",
                   help="folder of text.onnx, text-int8.onnx, ... (bench/run builds them; built here when missing)")
    p.add_argument("--workloads", default=DEFAULT_WORKLOADS, help=f"comma-separated, of: {', '.join(WORKLOADS)}")
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop clients")
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds per load run")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads of the server and of raw ORT")
    p.add_argument("--raw-batches", default="1,8,16,32", help="raw ORT batch sizes, comma-separated")
    p.add_argument("--raw-duration", type=float, default=5.0, help="seconds of raw ORT per batch size")
    p.add_argument("--server-args", default="", help="extra d2v-serve flags")
    p.add_argument("--rounds", type=int, default=1, help="alternating server / raw ORT measurements; the cheapest "
                                                         "of each is reported")
    p.add_argument("--floor", action="store_true", help="also measure gRPC's own CPU per call: bench/grpc_floor.py "
                                                        "(a canned answer after the server's median latency) "
                                                        "under the same load")
    p.add_argument("--profile", type=Path, help="also record the server with py-spy during each load run: "
                                                "WORKLOAD.txt (collapsed stacks) in this folder")
    p.add_argument("--json", type=Path, help="write the results here")
    return p


def profile_command(pid: int, out: Path, seconds: float) -> list[str]:
    """py-spy sampling the server's threads (GIL holders and not, native frames off) for `seconds`."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return [exe, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))), "--rate", "250",
            "--format", "raw", "--output", str(out), "--nonblocking"]


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of a process (Linux /proc; empty elsewhere)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def split_by_thread(pid: int, before: dict[int, float], after: dict[int, float], total: float) -> dict[str, float]:
    """CPU seconds of the busiest thread (the model's worker, which runs ORT), the main thread (the event loop) and
    the rest (threads that ended included)."""
    used = {tid: seconds - before.get(tid, 0.0) for tid, seconds in after.items()}
    loop = used.pop(pid, 0.0)
    model = max(used.values(), default=0.0)
    return {"model_thread": model, "event_loop": loop, "other": total - model - loop}


def grpc_floor(model_file: Path, workload: str, delay_ms: float, args: argparse.Namespace) -> dict[str, Any]:
    """CPU per call of bench/grpc_floor.py driven like the server (calls started, the few cancelled at the end of the
    run included)."""
    from bench.server import cpu_seconds, free_port, run_loadgen

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.grpc_floor", "--port", str(port), "--delay-ms",
                             str(delay_ms)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        if proc.stdout is None or proc.stdout.readline().strip() != "serving":
            raise RuntimeError("bench.grpc_floor did not start")
        cpu0 = cpu_seconds(proc.pid)
        load = run_loadgen(f"127.0.0.1:{port}", model_file.stem, model_file, workload, args.concurrency,
                           args.duration, args.warmup)
        cpu = cpu_seconds(proc.pid) - cpu0
    finally:
        proc.terminate()
        proc.wait(30)
    return {"delay_ms": delay_ms, "calls": load["calls"], "cpu_s": round(cpu, 3),
            "cpu_ms_per_call": round(1000 * cpu / load["calls"], 4) if load["calls"] else None}


def measure(model_file: Path, workload: str, args: argparse.Namespace) -> dict[str, Any]:
    """One round: the server under load, then raw ORT."""
    from bench.server import D2vServer, run_loadgen

    name = model_file.stem
    server_args = ["--intra-op-threads", str(args.threads), *args.server_args.split()]
    with D2vServer([model_file], server_args) as server:
        profiler = None
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            # starts with the load; its warm-up is sampled too, which a profile's shares barely notice
            profiler = subprocess.Popen(profile_command(server.proc.pid, args.profile / f"{workload}.txt",
                                                        args.warmup + args.duration),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        cpu0, n0 = server.usage(name)
        threads0 = thread_cpu(server.proc.pid)
        wall0 = time.perf_counter()
        load = run_loadgen(server.target, name, model_file, workload, args.concurrency, args.duration, args.warmup,
                           min_items=args.concurrency, metrics_url=server.metrics_url)
        cpu1, n1 = server.usage(name)
        threads1 = thread_cpu(server.proc.pid)
        wall = time.perf_counter() - wall0
        split = split_by_thread(server.proc.pid, threads0, threads1, cpu1 - cpu0)
        if profiler is not None:
            _, err = profiler.communicate(timeout=120)
            if profiler.returncode != 0:
                print(f"bench.overhead: py-spy failed: {err.strip()[-300:]}", file=sys.stderr)
    items = n1 - n0
    floor = grpc_floor(model_file, workload, load["p50_ms"], args) if args.floor else None
    batches = [int(b) for b in args.raw_batches.split(",") if b.strip()]
    raw = engines.in_fresh_process(engines.raw_ort, model_file, workload, batches, args.raw_duration, args.threads)
    cheapest = max(raw, key=lambda r: r["items_per_cpu_s"] or 0.0)
    server_ms = 1000 * (cpu1 - cpu0) / items if items else float("nan")
    raw_ms = 1000 / cheapest["items_per_cpu_s"]
    return {
        "workload": workload, "model": name, "concurrency": args.concurrency, "threads": args.threads,
        "server": {"items": items, "cpu_s": round(cpu1 - cpu0, 3), "wall_s": round(wall, 2),
                   "cpu_ms_per_item": round(server_ms, 4), "items_per_s": load["items_per_s"],
                   **{f"{k}_ms_per_item": round(1000 * v / items, 4) if items else None for k, v in split.items()},
                   "mean_batch": load.get("server", {}).get("mean_batch"),
                   "p50_ms": load["p50_ms"], "p99_ms": load["p99_ms"], "errors": load["errors"]},
        "raw_ort": raw,
        "raw_cpu_ms_per_item": round(raw_ms, 4), "raw_best_batch": cheapest["batch"],
        "overhead_cpu_ms_per_item": round(server_ms - raw_ms, 4),
        "cpu_ratio": round(raw_ms / server_ms, 3),
        "grpc_floor": floor,
    }


def cheapest(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The rounds combined: the cheapest server round and the cheapest raw ORT round, each round's ratio kept."""
    server = min(rounds, key=lambda r: r["server"]["cpu_ms_per_item"])
    raw = min(rounds, key=lambda r: r["raw_cpu_ms_per_item"])
    server_ms, raw_ms = server["server"]["cpu_ms_per_item"], raw["raw_cpu_ms_per_item"]
    return {**server, "raw_ort": raw["raw_ort"], "raw_cpu_ms_per_item": raw_ms, "raw_best_batch": raw["raw_best_batch"],
            "overhead_cpu_ms_per_item": round(server_ms - raw_ms, 4), "cpu_ratio": round(raw_ms / server_ms, 3),
            "rounds": [{"server_cpu_ms_per_item": r["server"]["cpu_ms_per_item"],
                        "raw_cpu_ms_per_item": r["raw_cpu_ms_per_item"], "cpu_ratio": r["cpu_ratio"]} for r in rounds]}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| workload | server CPU ms / item (model thread, event loop, other) | raw ORT CPU ms / item (batch) | "
             "overhead ms / item | raw / server (CPU) | server items/s, mean batch |", "|---|---|---|---|---|---|"]
    for r in rows:
        s = r["server"]
        lines.append(f"| {r['workload']} | {s['cpu_ms_per_item']:.3f} ({s['model_thread_ms_per_item']:.3f}, "
                     f"{s['event_loop_ms_per_item']:.3f}, {s['other_ms_per_item']:.3f}) | "
                     f"{r['raw_cpu_ms_per_item']:.3f} ({r['raw_best_batch']}) | {r['overhead_cpu_ms_per_item']:.3f} | "
                     f"**{r['cpu_ratio']:.3f}** | {s['items_per_s']:.1f}, {s['mean_batch']} |")
    floors = [r for r in rows if r.get("grpc_floor")]
    if floors:
        lines += ["", "| workload | gRPC floor: CPU ms per call (canned answer after ms) | server event loop + other "
                      "beyond it, ms / item |", "|---|---|---|"]
        for r in floors:
            f, s = r["grpc_floor"], r["server"]
            beyond = s["event_loop_ms_per_item"] + s["other_ms_per_item"] - f["cpu_ms_per_call"]
            lines.append(f"| {r['workload']} | {f['cpu_ms_per_call']:.3f} ({f['delay_ms']:.0f}) | {beyond:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    try:
        workloads = parse_workloads(args.workloads)
        if args.concurrency < 1 or args.threads < 1 or args.rounds < 1 or args.duration <= 0:
            raise ValueError("--concurrency, --threads and --rounds must be >= 1, --duration > 0")
        if not all((args.models_dir / f"{w.model}.onnx").exists() for w in workloads):
            from bench.models import ensure_models

            if args.models_dir.parent.name != "bench-models":
                raise ValueError(f"no model files for {args.workloads} in {args.models_dir}")
            ensure_models(list(dict.fromkeys(w.model for w in workloads)), args.models_dir.name,
                          root=args.models_dir.parent)
        rows = [cheapest([measure(args.models_dir / f"{w.model}.onnx", w.name, args) for _ in range(args.rounds)])
                for w in workloads]
    except (ValueError, RuntimeError) as exc:
        print(f"bench.overhead: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": "python -m bench.overhead " + " ".join(argv),
                                         "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                         "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
