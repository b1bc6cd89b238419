"""Throughput of the d2v server against raw ONNX Runtime at the same batch size, in one run (not a test).

    .venv/bin/python bench/serve_throughput.py                      # random base text + audio models, built once
    .venv/bin/python bench/serve_throughput.py --models DIR --text-model NAME --audio-model NAME

For each workload (short text ~12 tokens, long text ~128 tokens, audio clips) it starts the real `d2v-serve` with
just that model, drives it with --concurrency closed-loop clients (one input per call, each its own channel) for
--duration seconds, then runs the same model file in-process with the same session settings on batches of the
same inputs: at batch = concurrency and at the server's mean batch size. The server's rate is taken between two
batch completions (its /metrics), the runtime's over whole runs. Server and runtime never run at once; the sides
alternate for --rounds rounds and the best of each is reported (a shared machine only ever slows one down).
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


def clips_of(seconds: float, n: int, seed: int, rate: int = 16000) -> list[Pcm]:
    rng = np.random.default_rng(seed)
    return [Pcm((0.1 * rng.standard_normal(int(seconds * rate))).astype(np.float32), rate) for _ in range(n)]


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


def _batches(port: int, name: str) -> tuple[float, float]:
    """(batches run, items run) by the server's model `name`, from one scrape of /metrics."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for line in body.splitlines():
        for key in ("count", "sum"):
            if line.startswith(f'd2v_batch_size_{key}{{model="{name}"}}'):
                values[key] = float(line.split()[-1])
    return values.get("count", 0.0), values.get("sum", 0.0)


def measure_server(model_file: Path, inputs: list, concurrency: int, duration: float, min_items: int,
                   extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / model_file.name).symlink_to(model_file.resolve())
        port, metrics_port = _free_port(), _free_port()
        cmd = [str(Path(sys.executable).with_name("d2v-serve")), "--models", tmp, "--port", str(port),
               "--host", "127.0.0.1", "--metrics-port", str(metrics_port), "--log-level", "warning", *extra]
        proc = subprocess.Popen(cmd)
        target, name = f"127.0.0.1:{port}", model_file.stem
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
                        c.embed(inputs[i % len(inputs)], name)
                        i += concurrency

            threads = [threading.Thread(target=client_loop, args=(k,), daemon=True) for k in range(concurrency)]
            for t in threads:
                t.start()
            time.sleep(min(5.0, duration / 3))  # ramp up
            # The window runs from the end of one batch to the end of another (seen in the server's batch
            # counters): whole batches only, so the rate has no quantization bias even with few, slow batches.
            t0, c0, s0 = _batch_edge(metrics_port, name)
            time.sleep(max(0.0, duration - 0.5))
            while True:
                t1, c1, s1 = _batch_edge(metrics_port, name)
                if t1 - t0 >= duration and s1 - s0 >= min_items:
                    break
            stop.set()
            for t in threads:
                t.join(600)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    return {"items_per_s": (s1 - s0) / (t1 - t0), "mean_batch": (s1 - s0) / (c1 - c0)}


def _batch_edge(port: int, name: str, poll_s: float = 0.02) -> tuple[float, float, float]:
    """Wait for the next completed batch: (time, batches so far, items so far)."""
    count, _ = _batches(port, name)
    while True:
        time.sleep(poll_s)
        now, (new, items) = time.monotonic(), _batches(port, name)
        if new != count:
            return now, new, items


# ---- raw ONNX Runtime ---------------------------------------------------------------------------------------


def measure_runtime(model_file: Path, items: list[np.ndarray], batch: int, duration: float, min_items: int,
                    threads: int) -> float:
    """Items/s of the model file run in this process on batches of `batch` prepared items."""
    meta = read_metadata(model_file)
    settings = runtime_settings(ServerConfig(intra_op_threads=threads), 1)
    runner = Runner(create_session(str(model_file), settings))
    pad_id = meta["preprocessing"].get("pad_id", 1)
    batches = [collate(meta["modality"], [items[(i * batch + j) % len(items)] for j in range(batch)], pad_id)
               for i in range(max(1, len(items) // batch))]
    outputs = ["last_hidden_state", "output_mask"]
    runner.run(batches[0], outputs)  # warm-up
    done, start, i = 0, time.monotonic(), 0
    while time.monotonic() - start < duration or done < min_items:
        runner.run(batches[i % len(batches)], outputs)
        done += batch
        i += 1
    return done / (time.monotonic() - start)


# ---- main ---------------------------------------------------------------------------------------------------


def measure_runtime_fresh(*args: object) -> float:
    """measure_runtime in a fresh process: nothing the benchmark did before (threads, torch) weighs on it."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(measure_runtime, *args).result()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, help="directory with the model files (default: build random ones)")
    p.add_argument("--preset", default="base", help="preset of the random models built without --models")
    p.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench")
    p.add_argument("--text-model", default="text")
    p.add_argument("--audio-model", default="audio")
    p.add_argument("--workloads", default="short,long,audio")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per workload and side")
    p.add_argument("--rounds", type=int, default=3, help="alternating measurements per side; best reported")
    p.add_argument("--min-batches", type=int, default=4,
                   help="measure at least this many x concurrency items per side (slow models)")
    p.add_argument("--audio-seconds", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: all cores), both sides")
    p.add_argument("--server-args", default="", help="extra d2v-serve flags, e.g. '--max-delay-ms 5'")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    models = args.models or build_models(args.work_dir, args.preset)
    extra = args.server_args.split() + (["--intra-op-threads", str(args.threads)] if args.threads else [])
    threads = args.threads or os.cpu_count() or 1
    rows = []
    for workload in args.workloads.split(","):
        name = args.audio_model if workload == "audio" else args.text_model
        model_file = models / f"{name}.onnx"
        meta = read_metadata(model_file)
        n = max(4 * args.concurrency, 64)
        if workload == "audio":
            inputs = clips_of(args.audio_seconds, n, seed=1)
        else:
            inputs = texts_of(meta, 12 if workload == "short" else 128, n, seed=0 if workload == "short" else 1)
        min_items = args.min_batches * args.concurrency
        items = prepared(meta, inputs)
        server_runs, at_n_runs, at_mean_runs, mean_batches = [], [], [], []
        for _ in range(args.rounds):  # alternate the sides; the best of each is reported (noise only slows down)
            server = measure_server(model_file, inputs, args.concurrency, args.duration, min_items, extra)
            server_runs.append(server["items_per_s"])
            mean_batches.append(server["mean_batch"])
            at_n_runs.append(measure_runtime_fresh(model_file, items, args.concurrency, args.duration, min_items,
                                                   threads))
            mean_b = max(1, round(mean_batches[0]))
            at_mean_runs.append(at_n_runs[-1] if mean_b == args.concurrency else measure_runtime_fresh(
                model_file, items, mean_b, args.duration, min_items, threads))
        row = {"workload": workload, "model": name, "concurrency": args.concurrency,
               "server_items_per_s": round(max(server_runs), 1),
               "server_mean_batch": round(float(np.mean(mean_batches)), 1),
               f"ort_items_per_s_b{args.concurrency}": round(max(at_n_runs), 1),
               "ort_items_per_s_at_server_batch": round(max(at_mean_runs), 1),
               "server_over_ort": round(max(server_runs) / max(at_n_runs), 2),
               "runs": {"server": [round(x, 1) for x in server_runs], "ort_n": [round(x, 1) for x in at_n_runs],
                        "ort_mean": [round(x, 1) for x in at_mean_runs]}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(f"{'workload':9} {'server/s':>9} {'mean batch':>10} {'ORT/s @N':>9} {'ORT/s @mean':>11} {'ratio':>6}")
    for r in rows:
        print(f"{r['workload']:9} {r['server_items_per_s']:9.1f} {r['server_mean_batch']:10.1f} "
              f"{r[f'ort_items_per_s_b{args.concurrency}']:9.1f} {r['ort_items_per_s_at_server_batch']:11.1f} "
              f"{r['server_over_ort']:6.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
