"""Throughput of the d2v server at concurrency 1 and N against raw ONNX Runtime at its best batch, in one run.

    .venv/bin/python bench/serve_throughput.py                      # random base models, built once
    .venv/bin/python bench/serve_throughput.py --workloads mixed --server-cpus 0 --threads 1
    .venv/bin/python bench/serve_throughput.py --models DIR --text-model NAME --audio-model NAME

Workloads: short (text, ~12 tokens), long (text, ~128 tokens), audio (--audio-seconds clips), mixed (audio clips of
uniform 0.5-10 s), short-int8 (short text on the int8 export, --int8-model). For each, it starts the real `d2v-serve`
with just that model (pinned to --server-cpus with taskset when given), drives it with closed-loop clients (one input
per call, each its own channel, every input distinct) at concurrency 1 and --concurrency for --duration seconds each,
then runs the same model file in a fresh process with the same session settings on batches of the same prepared
inputs, at each batch size of --ort-batches (mixed audio: length-sorted batches, as a careful user would). The
server's rate is taken between two batch completions (its /metrics); from the same scrape come its batch-size
histogram, padded fraction (d2v_batch_positions_total) and session busy fraction (d2v_session_busy_seconds_total);
latency percentiles are the clients' own. Server and runtime never run at once; the sides alternate for --rounds
rounds and the best of each is reported (a shared machine only ever slows one down). Beside items per second, it
reports items per CPU-second of the server process (all threads) and of the runtime process: on a shared machine
these ratios hold up where wall-clock ones do not (they do not see a session left idle: read the busy fraction).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from d2v_serve.client import Client, Pcm  # noqa: E402
from d2v_serve.config import ServerConfig  # noqa: E402
from d2v_serve.model_file import read_metadata  # noqa: E402
from d2v_serve.preprocess import collate, preprocessing_from_dict  # noqa: E402
from d2v_serve.registry import runtime_settings  # noqa: E402
from d2v_serve.runtime import Runner, create_session  # noqa: E402

WORDS = ("the of and to in is was for that with as by on from at are this his an be which or had not it have "
         "first new were also one two after their its but has more who all other time they been years into "
         "city world school music states during played film series later team").split()


# ---- models -------------------------------------------------------------------------------------------------


def build_models(work_dir: Path, preset: str) -> Path:
    """Random-weight `preset` text and audio models (standard configs), exported by d2v-export; cached."""
    out = work_dir / f"models-{preset}"
    if all((out / f"{m}.onnx").exists() for m in ("text", "audio")):
        return out
    out.mkdir(parents=True, exist_ok=True)
    import torch

    from d2v_serve.preprocess import AudioPreprocessing, train_bpe_tokenizer
    from training.checkpoint import make_checkpoint, save_checkpoint
    from training.models import EncoderConfig, build_encoder

    corpus = [" ".join(np.random.default_rng(i).choice(WORDS, size=40)) for i in range(400)]
    for modality in ("text", "audio"):
        cfg = EncoderConfig.preset(modality, preset)
        if modality == "text":
            pre = train_bpe_tokenizer(corpus, vocab_size=2000, min_frequency=1)
            cfg = cfg.replace(vocab_size=pre.vocab_size)
        else:
            pre = AudioPreprocessing()
        torch.manual_seed(0)
        ckpt = work_dir / f"{modality}-{preset}.pt"
        save_checkpoint(ckpt, make_checkpoint(cfg, build_encoder(cfg).state_dict(), pre.to_dict()))
        subprocess.run([str(Path(sys.executable).with_name("d2v-export")), str(ckpt), "-o",
                        str(out / f"{modality}.onnx")], check=True)
    return out


# ---- inputs -------------------------------------------------------------------------------------------------


def texts_of(meta: dict, tokens: int, n: int, seed: int) -> list[str]:
    """n random sentences of about `tokens` tokens (incl. <s> </s>) under the model's tokenizer."""
    pre = preprocessing_from_dict("text", meta["preprocessing"])
    if tokens > min(pre.max_length, meta.get("max_positions") or pre.max_length):
        raise SystemExit(f"the text model takes fewer than {tokens} tokens")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words: list[str] = []
        while len(pre.tokenizer.encode(" ".join(words) or "a").ids) < tokens:
            words.append(str(rng.choice(WORDS)))
        out.append(" ".join(words))
    return out


def clips_of(seconds: float | tuple[float, float], n: int, seed: int, rate: int = 16000) -> list[Pcm]:
    """n noise clips of `seconds`, or of lengths drawn uniformly from a (low, high) range."""
    rng = np.random.default_rng(seed)
    low, high = seconds if isinstance(seconds, tuple) else (seconds, seconds)
    return [Pcm((0.1 * rng.standard_normal(int(rng.uniform(low, high) * rate))).astype(np.float32), rate)
            for _ in range(n)]


def prepared(meta: dict, inputs: list) -> list[np.ndarray]:
    pre = preprocessing_from_dict(meta["modality"], meta["preprocessing"])
    if meta["modality"] == "text":
        return [pre.prepare(t) for t in inputs]
    return [pre.prepare(p.samples, p.sample_rate) for p in inputs]


# ---- the server ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int, name: str) -> dict[str, float]:
    """The batcher's counters for model `name` from one scrape of /metrics: batches, items, batch-size bucket
    counts (cumulative, by upper bound), valid and padded positions, busy seconds."""
    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.labels.get("model") != name:
                continue
            if sample.name == "d2v_batch_size_count":
                out["batches"] = sample.value
            elif sample.name == "d2v_batch_size_sum":
                out["items"] = sample.value
            elif sample.name == "d2v_batch_size_bucket":
                out[f"le:{sample.labels['le']}"] = sample.value
            elif sample.name == "d2v_batch_positions_total":
                out[sample.labels["kind"]] = sample.value
            elif sample.name == "d2v_session_busy_seconds_total":
                out["busy"] = sample.value
    return out


def _batch_edge(port: int, name: str, poll_s: float = 0.02) -> tuple[float, dict[str, float]]:
    """Wait for the next completed batch: (time, counters)."""
    count = scrape(port, name).get("batches", 0.0)
    while True:
        time.sleep(poll_s)
        now, counters = time.monotonic(), scrape(port, name)
        if counters.get("batches", 0.0) != count:
            return now, counters


def _histogram(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """Batches per batch-size bucket between two scrapes, e.g. {"1": 3, "2-2": 0, "3-3": 5, "4-4": 1, "5-6": 2}."""
    bounds = sorted((float(k[3:]), k) for k in after if k.startswith("le:") and k != "le:+Inf")
    out, below, low = {}, 0.0, 1
    for bound, key in bounds:
        cumulative = after[key] - before.get(key, 0.0)
        if cumulative - below:
            out[str(int(bound)) if low == int(bound) else f"{low}-{int(bound)}"] = int(cumulative - below)
        below, low = cumulative, int(bound) + 1
    return out


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_server(model_file: Path, inputs: list, concurrency: int, duration: float, min_items: int,
                   extra: list[str], cpus: str = "") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / model_file.name).symlink_to(model_file.resolve())
        port, metrics_port = _free_port(), _free_port()
        cmd = [str(Path(sys.executable).with_name("d2v-serve")), "--models", tmp, "--port", str(port),
               "--host", "127.0.0.1", "--http-port", "0", "--metrics-port", str(metrics_port), "--log-level", "warning",
               *extra]
        proc = subprocess.Popen((["taskset", "-c", cpus] if cpus else []) + cmd)
        target, name = f"127.0.0.1:{port}", model_file.stem
        latencies: list[tuple[float, float]] = []  # (end time, seconds) of every call
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    with Client(target, timeout=2) as c:
                        if c.health() == "SERVING":
                            break
                except Exception:  # noqa: BLE001 - not up yet
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"d2v-serve did not come up: {' '.join(cmd)}")
                time.sleep(0.2)
            stop = threading.Event()

            def client_loop(k: int) -> None:
                with Client(target, timeout=600) as c:
                    i = k
                    while not stop.is_set():
                        t = time.monotonic()
                        c.embed(inputs[i % len(inputs)], name)
                        end = time.monotonic()
                        latencies.append((end, end - t))
                        i += concurrency

            threads = [threading.Thread(target=client_loop, args=(k,), daemon=True) for k in range(concurrency)]
            for t in threads:
                t.start()
            time.sleep(min(5.0, duration / 3))  # ramp up
            # The window runs from the end of one batch to the end of another (seen in the server's batch
            # counters): whole batches only, so the rate has no quantization bias even with few, slow batches.
            t0, m0 = _batch_edge(metrics_port, name)
            cpu0 = _cpu_seconds(proc.pid)
            time.sleep(max(0.0, duration - 0.5))
            while True:
                t1, m1 = _batch_edge(metrics_port, name)
                cpu1 = _cpu_seconds(proc.pid)
                if t1 - t0 >= duration and m1["items"] - m0["items"] >= min_items:
                    break
            stop.set()
            for t in threads:
                t.join(600)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    items, batches = m1["items"] - m0["items"], m1["batches"] - m0["batches"]
    valid, padded = m1.get("valid", 0) - m0.get("valid", 0), m1.get("padded", 0) - m0.get("padded", 0)
    window = np.array([s for end, s in latencies if t0 <= end <= t1]) * 1000
    return {"items_per_s": items / (t1 - t0), "items_per_cpu_s": items / max(1e-9, cpu1 - cpu0),
            "mean_batch": items / batches, "batches": _histogram(m0, m1),
            "padded_fraction": padded / max(1.0, valid + padded),
            "busy_fraction": (m1.get("busy", 0) - m0.get("busy", 0)) / (t1 - t0),
            "p50_ms": float(np.percentile(window, 50)) if window.size else None,
            "p99_ms": float(np.percentile(window, 99)) if window.size else None}


# ---- raw ONNX Runtime ---------------------------------------------------------------------------------------


def measure_runtime(model_file: Path, items: list[np.ndarray], batch: int, duration: float, min_items: int,
                    threads: int, cpus: str = "") -> tuple[float, float]:
    """Items/s of the model file run in this process (on `cpus`, like the server) on batches of `batch` prepared
    items, each batch of inputs of neighbouring lengths (sorted), as a careful user with all inputs at hand would."""
    if cpus:
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    meta = read_metadata(model_file)
    settings = runtime_settings(ServerConfig(intra_op_threads=threads), 1)
    runner = Runner(create_session(str(model_file), settings))
    pad_id = meta["preprocessing"].get("pad_id", 1)
    ordered = sorted(items, key=len)
    batches = [collate(meta["modality"], ordered[i: i + batch], pad_id)
               for i in range(0, len(ordered) - batch + 1, batch)]
    outputs = ["last_hidden_state", "output_mask"]
    runner.run(batches[0], outputs)  # warm-up
    order = np.random.default_rng(0).permutation(len(batches))
    done, start, cpu, i = 0, time.monotonic(), time.process_time(), 0
    while time.monotonic() - start < duration or done < min_items:
        runner.run(batches[order[i % len(batches)]], outputs)
        done += batch
        i += 1
    return done / (time.monotonic() - start), done / (time.process_time() - cpu)


# ---- main ---------------------------------------------------------------------------------------------------


def measure_runtime_fresh(*args: object) -> tuple[float, float]:
    """measure_runtime in a fresh process: nothing the benchmark did before (threads, torch) weighs on it."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(measure_runtime, *args).result()


WORKLOADS = {  # name: (model argument, inputs, raw ORT batch sizes to try)
    "short": ("text_model", ("text", 12), (1, 16)),
    "long": ("text_model", ("text", 128), (1, 8)),
    "audio": ("audio_model", ("audio", None), (1, 4)),
    "mixed": ("audio_model", ("audio", (0.5, 10.0)), (1, 4)),
    "short-int8": ("int8_model", ("text", 12), (1, 16)),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, help="directory with the model files (default: build random ones)")
    p.add_argument("--preset", default="base", help="preset of the random models built without --models")
    p.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench")
    p.add_argument("--text-model", default="text")
    p.add_argument("--audio-model", default="audio")
    p.add_argument("--int8-model", default="text-int8", help="int8 export of the text model (built if missing)")
    p.add_argument("--workloads", default="short,long,audio,mixed,short-int8")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per workload, side and level")
    p.add_argument("--rounds", type=int, default=1, help="alternating measurements per side; best reported")
    p.add_argument("--min-batches", type=int, default=2,
                   help="measure at least this many x concurrency items per side (slow models)")
    p.add_argument("--audio-seconds", type=float, default=2.0)
    p.add_argument("--ort-batches", default="", help="raw ORT batch sizes, e.g. '1,16' (default: per workload)")
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: all cores), both sides")
    p.add_argument("--server-cpus", default="", help="pin the server (and raw ORT) to these CPUs, e.g. '0'")
    p.add_argument("--server-args", default="", help="extra d2v-serve flags, e.g. '--max-delay-ms 5'")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    models = args.models or build_models(args.work_dir, args.preset)
    extra = args.server_args.split() + (["--intra-op-threads", str(args.threads)] if args.threads else [])
    threads = args.threads or os.cpu_count() or 1
    rows = []
    for workload in args.workloads.split(","):
        model_arg, (modality, size), ort_batches = WORKLOADS[workload]
        name = getattr(args, model_arg)
        model_file = models / f"{name}.onnx"
        if workload == "short-int8" and not model_file.exists() and not args.models:
            subprocess.run([str(Path(sys.executable).with_name("d2v-export")), str(args.work_dir /
                            f"text-{args.preset}.pt"), "-o", str(model_file), "--int8", "-q"], check=True)
        meta = read_metadata(model_file)
        n = max(4 * args.concurrency, 64)
        if modality == "audio":
            inputs = clips_of(size or args.audio_seconds, n, seed=1)
        else:
            inputs = texts_of(meta, size, n, seed=0 if size == 12 else 1)
        items = prepared(meta, inputs)
        sizes = [int(b) for b in args.ort_batches.split(",")] if args.ort_batches else list(ort_batches)
        min_items = args.min_batches * args.concurrency
        server: dict[int, list[dict]] = {1: [], args.concurrency: []}
        ort: dict[int, list[tuple[float, float]]] = {b: [] for b in sizes}
        for _ in range(args.rounds):  # alternate the sides; the best of each is reported (noise only slows down)
            for level in server:
                server[level].append(measure_server(model_file, inputs, level, args.duration,
                                                    min(min_items, 4 * level), extra, args.server_cpus))
            for b in sizes:
                ort[b].append(measure_runtime_fresh(model_file, items, b, args.duration, min_items, threads,
                                                    args.server_cpus))
        best = {level: max(runs, key=lambda r: r["items_per_s"]) for level, runs in server.items()}
        cpu_best = {level: max(r["items_per_cpu_s"] for r in runs) for level, runs in server.items()}
        ort_best = {b: max(w for w, _ in v) for b, v in ort.items()}
        ort_cpu = {b: max(c for _, c in v) for b, v in ort.items()}
        top_b, top_cpu = max(ort_best, key=ort_best.get), max(ort_cpu.values())
        cn, c1, n = best[args.concurrency], best[1], args.concurrency
        row = {"workload": workload, "model": name, "concurrency": n,
               "server_cN_items_per_s": round(cn["items_per_s"], 2),
               "server_c1_items_per_s": round(c1["items_per_s"], 2),
               "ort_best_items_per_s": round(ort_best[top_b], 2), "ort_best_batch": top_b,
               "cN_over_c1": round(cn["items_per_s"] / c1["items_per_s"], 3),
               "cN_over_ort": round(cn["items_per_s"] / ort_best[top_b], 3),
               # per CPU-second of the server process (all its threads) and of the runtime's: what a dedicated
               # core would give when the session never idles, and robust to other load on a shared machine
               "cpu_cN_over_c1": round(cpu_best[n] / cpu_best[1], 3),
               "cpu_cN_over_ort": round(cpu_best[n] / top_cpu, 3),
               "cN_mean_batch": round(cn["mean_batch"], 1), "cN_batch_histogram": cn["batches"],
               "cN_padded_fraction": round(cn["padded_fraction"], 3), "cN_busy_fraction": round(cn["busy_fraction"], 3),
               "cN_p50_ms": cn["p50_ms"], "cN_p99_ms": cn["p99_ms"], "c1_p50_ms": c1["p50_ms"],
               "ort_items_per_s": {b: round(v, 2) for b, v in ort_best.items()},
               "ort_items_per_cpu_s": {b: round(v, 2) for b, v in ort_cpu.items()},
               "runs": {"server": {lv: [[round(r["items_per_s"], 2), round(r["items_per_cpu_s"], 2)] for r in runs]
                                   for lv, runs in server.items()},
                        "ort": {b: [[round(w, 2), round(c, 2)] for w, c in v] for b, v in ort.items()}}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(f"{'workload':11} {'c' + str(args.concurrency) + '/s':>8} {'c1/s':>8} {'ORT best/s':>12} {'cN/c1':>6} "
          f"{'cN/ORT':>7} {'cpu:cN/c1':>9} {'cpu:cN/ORT':>10} {'pad':>5} {'busy':>5} {'p99 ms':>8}  batch sizes")
    for r in rows:
        hist = " ".join(f"{k}:{v}" for k, v in r["cN_batch_histogram"].items())
        print(f"{r['workload']:11} {r['server_cN_items_per_s']:8.2f} {r['server_c1_items_per_s']:8.2f} "
              f"{r['ort_best_items_per_s']:8.2f} b{r['ort_best_batch']:<3} {r['cN_over_c1']:6.2f} "
              f"{r['cN_over_ort']:7.2f} {r['cpu_cN_over_c1']:9.2f} {r['cpu_cN_over_ort']:10.2f} "
              f"{r['cN_padded_fraction']:5.2f} {r['cN_busy_fraction']:5.2f} {r['cN_p99_ms'] or 0:8.0f}  {hist}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
