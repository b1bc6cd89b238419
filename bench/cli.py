"""`bench/run`: the d2v serving benchmark in one command. Prints markdown tables, writes one JSON.

    bench/run --quick                # 5 s per point (the first run also builds and caches the models)
    bench/run --full --json out.json
    bench/run --quick --workloads text-12,audio-mixed --concurrency 1,32 --server-args "--max-delay-ms 5"

For each workload it starts `d2v-serve` on just that workload's model (random-weight preset models, exported by
d2v-export and cached in runs/bench-models/), drives it from a separate process with bench/loadgen.py (closed
loop, one distinct input per call) at each concurrency, reads batch sizes and padding from the server's /metrics,
then stops it and runs the same model file directly with ONNX Runtime on the same inputs at several batch sizes.
Then: torch eager against ORT fp32 and int8 on one padded batch (speed and pooled cosine), and numpy's float32
matmul peak, against which the model FLOP/s at the top concurrency are set. Server and references never run at
once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

from bench import engines, report  # noqa: E402
from bench.workloads import WORKLOADS, Workload, parse_workloads  # noqa: E402

DEFAULT_WORKLOADS = "text-12,text-128,audio-2s,audio-mixed,text-12-int8"


@dataclass(frozen=True)
class Mode:
    duration: float  # measured seconds per load run
    warmup: float
    raw_duration: float
    raw_batches: tuple[int, ...]  # empty: 1 and the server's mean batch at the top concurrency
    engines: tuple[tuple[str, int, int], ...]  # (modality, batch, length in tokens or samples)
    engine_threads: tuple[int, ...]  # 0: all cores
    repeat: int
    rounds: int  # alternating server / raw ORT measurements; the best of each is reported


MODES = {
    "quick": Mode(duration=5.0, warmup=2.0, raw_duration=3.0, raw_batches=(), engines=(("text", 8, 128),),
                  engine_threads=(0,), repeat=2, rounds=1),
    "full": Mode(duration=20.0, warmup=5.0, raw_duration=10.0, raw_batches=(1, 4, 8, 16, 32),
                 engines=(("text", 32, 128), ("audio", 8, 80000)), engine_threads=(1, 2), repeat=5, rounds=2),
}


def parse_levels(text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32] (sorted, distinct, each >= 1)."""
    try:
        levels = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--concurrency takes comma-separated integers, got {text!r}") from None
    if not levels or levels[0] < 1:
        raise ValueError(f"--concurrency needs integers >= 1, got {text!r}")
    return levels


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick", help="short runs (default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="longer runs, raw ORT at batch 1-32, engines at 1 and 2 threads, audio too")
    p.set_defaults(mode="quick")
    p.add_argument("--workloads", default=DEFAULT_WORKLOADS, help=f"comma-separated, of: {', '.join(WORKLOADS)}")
    p.add_argument("--concurrency", default="1,8,32", help="closed-loop clients, comma-separated")
    p.add_argument("--duration", type=float, help="measured seconds per load run (default: the mode's)")
    p.add_argument("--warmup", type=float, help="seconds of load before each measurement (default: the mode's)")
    p.add_argument("--preset", default="base", choices=("tiny", "small", "base"), help="size of the random models")
    p.add_argument("--models-dir", type=Path, help="use these model files (text.onnx, text-int8.onnx, audio.onnx, "
                                                   "...) instead of building random ones")
    p.add_argument("--server-args", default="", help="extra d2v-serve flags, e.g. '--max-delay-ms 5'")
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads of the server and of raw ORT "
                                                          "(0: all cores)")
    p.add_argument("--rounds", type=int, help="alternating server / raw ORT measurements, best of each reported "
                                             "(default: the mode's)")
    p.add_argument("--server-cpus", default="", help="pin the server and raw ORT to these CPUs (taskset -c), "
                                                      "e.g. '0': the load generator then has the other core")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="the server's and raw ORT's device")
    p.add_argument("--no-engines", action="store_true", help="skip torch eager vs ORT fp32 / int8")
    p.add_argument("--no-gemm", action="store_true", help="skip the matmul peak")
    p.add_argument("--note", default="", help="free text stored with the results (e.g. what else ran)")
    p.add_argument("--json", type=Path, help="write the results here (default: runs/bench/MODE-TIME.json)")
    p.add_argument("--markdown", type=Path, help="also write the tables here")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Arguments with the mode's defaults filled in; ValueError (one line) on bad values."""
    args = parser().parse_args(argv)
    mode = MODES[args.mode]
    args.workload_list = parse_workloads(args.workloads)
    args.levels = parse_levels(args.concurrency)
    args.duration = mode.duration if args.duration is None else args.duration
    args.warmup = mode.warmup if args.warmup is None else args.warmup
    args.rounds = mode.rounds if args.rounds is None else args.rounds
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    if args.duration <= 0 or args.warmup < 0:
        raise ValueError("--duration must be > 0 and --warmup >= 0")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if args.models_dir is not None and not args.models_dir.is_dir():
        raise ValueError(f"--models-dir {args.models_dir} is not a folder")
    return args


def machine() -> dict[str, Any]:
    import numpy
    import onnxruntime

    from d2v_serve.backend.runner import cpu_cores

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    memory = 0.0
    try:
        memory = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    except (OSError, IndexError, ValueError):
        pass
    return {"cores": cpu_cores(), "cpu": cpu, "memory_gib": round(memory, 1), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__, "platform": platform.platform()}


def raw_batches(mode: Mode, top_load: dict[str, Any]) -> list[int]:
    """Batch sizes to run raw ORT at: the mode's, or 1 and the server's mean batch at the top concurrency."""
    if mode.raw_batches:
        return list(mode.raw_batches)
    mean = top_load.get("server", {}).get("mean_batch") or 1
    return sorted({1, max(1, round(mean))})


def item_flops(models_dir: Path, workload: Workload, units_per_item: float | None) -> float | None:
    """FLOPs of one of the workload's inputs (at its mean length), when the model's config is known."""
    from bench.models import encoder_config, split_name

    modality, _ = split_name(workload.model)
    if not (models_dir / f"{modality}.config.json").exists() or not units_per_item:
        return None
    cfg = encoder_config(models_dir, modality)
    length = units_per_item * 16000 if modality == "audio" else units_per_item
    return engines.model_flops(cfg, length)


def measure_load(server: Any, name: str, model_file: Path, workload: str, concurrency: int,
                 args: argparse.Namespace) -> dict[str, Any]:
    """One load run against `server`, with the server's CPU seconds per item over it."""
    from bench.server import run_loadgen

    cpu0, n0 = server.usage(name)
    load = run_loadgen(server.target, name, model_file, workload, concurrency, args.duration, args.warmup,
                       min_items=concurrency, metrics_url=server.metrics_url)
    cpu1, n1 = server.usage(name)
    # CPU per item holds on a shared machine, where wall-clock rates swing with the neighbours
    load["items_per_cpu_s"] = round((n1 - n0) / (cpu1 - cpu0), 3) if cpu1 > cpu0 else None
    return load


def best_of(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """The faster of two measurements of the same thing (items/s), the other rounds' rates kept beside it."""
    if old is None:
        return {**new, "rounds": [new["items_per_s"]]}
    rounds = [*old["rounds"], new["items_per_s"]]
    return {**(new if new["items_per_s"] > old["items_per_s"] else old), "rounds": rounds}


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.models import ensure_models
    from bench.server import D2vServer
    from d2v_serve.backend.runner import cpu_cores

    mode = MODES[args.mode]
    workloads: list[Workload] = args.workload_list
    names = list(dict.fromkeys(w.model for w in workloads))
    engine_models = [] if args.no_engines else [m for m, _, _ in mode.engines]
    if args.models_dir:
        models_dir = args.models_dir
    else:
        extra = [f"{m}-int8" if m == "text" else m for m in engine_models] + engine_models
        models_dir = ensure_models(list(dict.fromkeys(names + extra)), args.preset, say=say)
    missing = [n for n in names if not (models_dir / f"{n}.onnx").exists()]
    if missing:
        raise ValueError(f"no {', '.join(m + '.onnx' for m in missing)} in {models_dir}")
    threads = args.threads or (len(args.server_cpus.split(",")) if args.server_cpus else cpu_cores())
    server_args = args.server_args.split() + ["--device", args.device]
    if args.threads:
        server_args += ["--intra-op-threads", str(args.threads)]
    results: dict[str, Any] = {
        "command": "bench/run " + " ".join(args.argv), "mode": args.mode, "note": args.note,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
        "preset": None if args.models_dir else args.preset, "models_dir": str(models_dir),
        "concurrency": args.levels, "duration_s": args.duration, "server_args": server_args, "ort_threads": threads,
        "workloads": [], "servers": [], "engines": [],
    }
    begin = time.perf_counter()
    if not args.no_gemm:
        say("matmul peak")
        results["gemm"] = engines.in_fresh_process(engines.gemm_peak, threads)
    for name in names:
        group = [w for w in workloads if w.model == name]
        model_file = models_dir / f"{name}.onnx"
        loads: dict[str, dict[int, dict[str, Any]]] = {w.name: {} for w in group}
        raws: dict[str, dict[int, dict[str, Any]]] = {w.name: {} for w in group}
        for round_ in range(args.rounds):  # server and raw ORT alternate; a busy neighbour only ever slows one down
            with D2vServer([model_file], server_args, cpus=args.server_cpus) as server:
                say(f"d2v-serve {name}: SERVING after {server.cold_start_s:.1f} s (round {round_ + 1})")
                for w in group:
                    for c in args.levels:
                        say(f"{w.name}: {c} client(s)")
                        load = measure_load(server, name, model_file, w.name, c, args)
                        loads[w.name][c] = best_of(loads[w.name].get(c), load)
                usage = {"models": name, "cold_start_s": round(server.cold_start_s, 2), **server.memory()}
                if round_ == 0:
                    results["servers"].append(usage)
            for w in group:
                batches = raw_batches(mode, loads[w.name][args.levels[-1]])
                say(f"{w.name}: raw ONNX Runtime, batch {', '.join(map(str, batches))}")
                for r in engines.in_fresh_process(engines.raw_ort, model_file, w.name, batches, mode.raw_duration,
                                                  threads, args.device, w.name == "audio-mixed", args.server_cpus):
                    raws[w.name][r["batch"]] = best_of(raws[w.name].get(r["batch"]), r)
        for w in group:
            top = loads[w.name][args.levels[-1]]
            results["workloads"].append(report.workload_row(
                w.name, name, loads[w.name], list(raws[w.name].values()),
                item_flops(models_dir, w, top.get("mean_units")), results.get("gemm", {}).get("gflops_per_cpu_s")))
    for modality, batch, length in mode.engines if not args.no_engines else ():
        ckpt = models_dir / f"{modality}.pt"
        files = {p: models_dir / f"{modality}{'' if p == 'fp32' else '-' + p}.onnx" for p in ("fp32", "int8")}
        files = {p: f for p, f in files.items() if f.exists()}
        if not ckpt.exists() or "fp32" not in files:
            say(f"engines: no {ckpt.name} or {modality}.onnx in {models_dir}; skipped")
            continue
        for t in mode.engine_threads:
            say(f"engines: {modality} {batch}x{length}, {t or threads} thread(s)")
            figures = engines.in_fresh_process(engines.torch_vs_ort, ckpt, files, batch, length, t or threads,
                                               mode.repeat)
            results["engines"].append(report.engine_row(modality, figures))
    results["goals"] = report.goals(results)
    results["seconds"] = round(time.perf_counter() - begin, 1)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        args.argv = argv
        results = run(args)
    except (ValueError, RuntimeError) as exc:
        print(f"bench/run: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    text = report.render(results)
    print(text)
    out = args.json or ROOT / "runs" / "bench" / f"{args.mode}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    if args.markdown:
        args.markdown.write_text(text)
    say(f"done in {results['seconds']:.0f} s; results in {os.path.relpath(out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
