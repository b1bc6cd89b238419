"""d2v-bulk measured as a user runs it: items per CPU-second against raw ONNX Runtime and against a loop of
`Client.embed_stream` calls to `d2v-serve`, Ray with 2 replicas against 1, and peak memory as the corpus grows.

    .venv/bin/python -m bench.bulk                                   # demo-text, 20k short texts
    .venv/bin/python -m bench.bulk --only memory --memory 10000,1000000
    .venv/bin/python -m bench.bulk --only speed --model bench:base --items 500 --raw-batches 8,16,32  # base size

`--model bench:PRESET` is a random-weight text model of that preset (base: 12 layers, hidden 768), built locally by
bench.models and cached under runs/bench-models/ (minutes the first time; nothing is downloaded).

One corpus of short texts (3-20 words) is made on the fly. Each contender runs in its own process, one after the
other, on the same model file and texts, with the same ORT intra-op threads (`--threads`):
- raw ORT: the model file on the texts tokenized beforehand (tokenizing not timed), sorted by length and run at each
  of `--raw-batches`; the best batch's items per CPU-second of that process.
- local: `d2v-bulk CORPUS --model M --out DIR` (the whole job: reading, tokenizing, batching, ORT, Parquet), its
  CPU seconds from wait4() less those of the same command on a one-line corpus (start-up: imports, model load,
  warm-up), per item embedded.
- server loop: `d2v-serve` on the model, and a client process that calls `Client.embed_stream` on chunks of 1000
  texts and writes each chunk's vectors to Parquet (what users write by hand): the server's CPU seconds (/proc) plus
  the client's (less its one-text start-up).
- bulk via server: `d2v-bulk --server` against the same server, counted the same way.
- Ray: `d2v-bulk --engine ray --replicas N --threads 1`, for N = 1 and 2: wall-clock items/s of the job (its summary
  line: from its first shard's dataset to its last commit), whose ratio is the scaling.
- memory: the local job's peak RSS (wait4) on corpora of each size in `--memory`.
Per-CPU-second figures hold on a busy machine (a neighbour only adds CPU time); wall-clock ones (Ray's ratio) do not,
so the load average is recorded beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import report
from bench.engines import in_fresh_process
from bench.server import D2vServer, cpu_seconds

ROOT = Path(__file__).resolve().parent.parent

WORDS = ("the a ferry leaves harbour at dawn violin is tuned before concert snow covered quiet village she fixed "
         "bicycle chain with spanner data model speech image text").split()
_SUMMARY = re.compile(r"d2v-bulk: (\d+) items, (\d+) errors, ([\d.]+) s, ([\d.]+) items/s")
_CLIENT_LOOP = """
import sys, pyarrow as pa, pyarrow.parquet as pq, numpy as np
from d2v_serve.client import Client
target, model, corpus, out = sys.argv[1:5]
texts = [line.rstrip("\\n") for line in open(corpus) if line.strip()]
with Client(target, timeout=3600) as client:
    for k, first in enumerate(range(0, len(texts), 1000)):
        vectors = np.stack(list(client.embed_stream(texts[first: first + 1000], model, batch_size=64)))
        column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
        pq.write_table(pa.table({"id": range(first, first + len(vectors)), "embedding": column}),
                       f"{out}/part-{k:05d}.parquet")
"""


def write_corpus(path: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    with path.open("w") as f:
        for _ in range(n):
            f.write(" ".join(words[rng.integers(0, len(words), rng.integers(3, 21))]) + "\n")
    return path


def run_measured(command: list[str]) -> dict[str, Any]:
    """Run a command to its end: wall seconds, CPU seconds and peak RSS (MiB) of that child alone (wait4), its
    stdout."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}): {err.read().strip()[-800:]}")
        return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024,
                "stdout": out.read()}


def summary(stdout: str) -> dict[str, float]:
    m = _SUMMARY.search(stdout)
    if m is None:
        raise RuntimeError(f"no summary line in {stdout!r}")
    return {"items": int(m[1]), "errors": int(m[2]), "job_wall_s": float(m[3]), "job_items_per_s": float(m[4])}


def bulk_command(corpus: Path, model: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "d2v_serve.bulk", str(corpus), "--model", model, "--out", str(out), "--quiet",
            *extra]


# ---- contenders ---------------------------------------------------------------------------------------------


def raw_ort(model_file: str, corpus: str, n: int, batches: list[int], threads: int) -> list[dict[str, Any]]:
    """Items per CPU-second of the model file on the corpus's first `n` texts, tokenized beforehand and sorted by
    length, at each batch size (runs in a fresh process)."""
    from d2v_serve.backend.runner import Runner, create_session
    from d2v_serve.config import ServerConfig
    from d2v_serve.models.model_file import read_metadata
    from d2v_serve.models.registry import runtime_settings
    from d2v_serve.preprocess import collate, preprocessing_from_dict

    meta = read_metadata(Path(model_file))
    pre = preprocessing_from_dict(meta.modality, meta.preprocessing)
    texts = [line.rstrip("\n") for _, line in zip(range(n), open(corpus), strict=False)]
    items = sorted((pre.prepare(t) for t in texts), key=len)
    settings = runtime_settings(ServerConfig(intra_op_threads=threads), 1)
    runner = Runner(create_session(model_file, settings))
    outputs = ["last_hidden_state", "output_mask"]
    results = []
    for batch in batches:
        feeds = [collate("text", items[i: i + batch], pre.pad_id) for i in range(0, len(items), batch)]
        runner.run(feeds[0], outputs)
        start, cpu = time.perf_counter(), time.process_time()
        for feed in feeds:
            runner.run(feed, outputs)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        results.append({"batch": batch, "items_per_s": round(len(items) / wall, 1),
                        "items_per_cpu_s": round(len(items) / cpu, 1)})
    return results


def local_engine(corpus: Path, one: Path, model: str, threads: int, work: Path) -> dict[str, Any]:
    base = run_measured(bulk_command(one, model, work / "local-1", "--threads", str(threads)))
    run = run_measured(bulk_command(corpus, model, work / "local", "--threads", str(threads)))
    s = summary(run["stdout"])
    cpu = run["cpu_s"] - base["cpu_s"]
    return {**s, "cpu_s": round(run["cpu_s"], 2), "startup_cpu_s": round(base["cpu_s"], 2),
            "items_per_cpu_s": round((s["items"] - 1) / cpu, 1), "peak_rss_mb": round(run["peak_rss_mb"], 1)}


def server_contenders(corpus: Path, one: Path, model_file: Path, threads: int, work: Path) -> dict[str, Any]:
    """The client loop and d2v-bulk --server, each against the same warm d2v-serve."""
    name = model_file.stem
    out: dict[str, Any] = {}
    with D2vServer([model_file], ["--intra-op-threads", str(threads)]) as server:
        loop = [sys.executable, "-c", _CLIENT_LOOP, server.target, name]
        (work / "loop-1").mkdir()
        (work / "loop").mkdir()
        base = run_measured([*loop, str(one), str(work / "loop-1")])
        before = cpu_seconds(server.proc.pid)
        run = run_measured([*loop, str(corpus), str(work / "loop")])
        served = cpu_seconds(server.proc.pid) - before
        n = sum(1 for _ in corpus.open())
        cpu = served + run["cpu_s"] - base["cpu_s"]
        out["server_loop"] = {"items": n, "wall_s": round(run["wall_s"], 2), "server_cpu_s": round(served, 2),
                              "client_cpu_s": round(run["cpu_s"] - base["cpu_s"], 2),
                              "items_per_cpu_s": round(n / cpu, 1), "items_per_s": round(n / run["wall_s"], 1)}

        base = run_measured(bulk_command(one, name, work / "via-1", "--server", server.target))
        before = cpu_seconds(server.proc.pid)
        run = run_measured(bulk_command(corpus, name, work / "via", "--server", server.target))
        served = cpu_seconds(server.proc.pid) - before
        s = summary(run["stdout"])
        cpu = served + run["cpu_s"] - base["cpu_s"]
        out["bulk_via_server"] = {**s, "server_cpu_s": round(served, 2),
                                  "client_cpu_s": round(run["cpu_s"] - base["cpu_s"], 2),
                                  "items_per_cpu_s": round(s["items"] / cpu, 1)}
    return out


def ray_replicas(corpus: Path, model: str, work: Path, replicas: list[int]) -> dict[str, Any]:
    """The job as a user runs it (the default shard size), one replica count after another."""
    out = {}
    for n in replicas:
        run = run_measured(bulk_command(corpus, model, work / f"ray-{n}", "--engine", "ray", "--replicas", str(n),
                                        "--threads", "1"))
        out[str(n)] = {**summary(run["stdout"]), "process_wall_s": round(run["wall_s"], 2),
                       "load_after": round(os.getloadavg()[0], 2)}
    return out


def memory(sizes: list[int], model: str, threads: int, work: Path) -> dict[str, Any]:
    out = {}
    for n in sizes:
        corpus = write_corpus(work / f"mem-{n}.txt", n, seed=n)
        run = run_measured(bulk_command(corpus, model, work / f"mem-{n}", "--threads", str(threads)))
        out[str(n)] = {**summary(run["stdout"]), "peak_rss_mb": round(run["peak_rss_mb"], 1)}
        corpus.unlink()
    return out


def bench_model(name: str) -> Path:
    """A model file, a demo model name, or bench:PRESET (bench.models' random text model of that preset)."""
    if name.startswith("bench:"):
        from bench.models import ensure_models

        return (ensure_models(["text"], name.removeprefix("bench:")) / "text.onnx").resolve()
    from d2v_serve.bulk.cli import model_file

    return model_file(name).resolve()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.bulk", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo-text", help="a text model file, a demo model name, or bench:PRESET "
                                                          "(a random text model of that preset, e.g. bench:base)")
    p.add_argument("--items", type=int, default=20000, help="texts in the corpus")
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (raw ORT, local, server)")
    p.add_argument("--raw-batches", default="8,16,32,64")
    p.add_argument("--replicas", default="1,2", help="Ray replica counts")
    p.add_argument("--memory", default="10000,100000", help="corpus sizes for the peak-RSS runs ('' skips)")
    p.add_argument("--only", choices=("speed", "ray", "memory"), action="append",
                   help="run only these parts (repeatable; default: all)")
    p.add_argument("--json", type=Path, default=ROOT / "runs" / "bench-bulk.json")
    p.add_argument("--write-docs", action="store_true", help="write the run's tables into docs/benchmarks.md")
    args = p.parse_args(argv)
    parts = set(args.only or ("speed", "ray", "memory"))
    if args.write_docs:
        report.check_doc_sections(["bulk", "bulk:memory"])

    model_path = bench_model(args.model)
    results: dict[str, Any] = {"command": "python -m bench.bulk " + " ".join(argv or sys.argv[1:]),
                               "model": str(model_path), "items": args.items, "threads": args.threads,
                               "cpus": os.cpu_count(), "load_before": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory(prefix="d2v-bench-bulk-") as tmp:
        work = Path(tmp)
        corpus = write_corpus(work / "corpus.txt", args.items)
        one = write_corpus(work / "one.txt", 1, seed=1)
        if "speed" in parts:
            batches = [int(b) for b in args.raw_batches.split(",")]
            raw = in_fresh_process(raw_ort, str(model_path), str(corpus), min(args.items, 8192), batches,
                                   args.threads)
            best = max(raw, key=lambda r: r["items_per_cpu_s"])
            results["raw_ort"] = {"batches": raw, "best": best}
            print(json.dumps({"raw_ort": results["raw_ort"]}), flush=True)
            results["local"] = local_engine(corpus, one, str(model_path), args.threads, work)
            print(json.dumps({"local": results["local"]}), flush=True)
            results.update(server_contenders(corpus, one, model_path, args.threads, work))
            print(json.dumps({k: results[k] for k in ("server_loop", "bulk_via_server")}), flush=True)
            local = results["local"]["items_per_cpu_s"]
            results["ratios"] = {"local_vs_raw_ort": round(local / best["items_per_cpu_s"], 3),
                                 "local_vs_server_loop": round(local / results["server_loop"]["items_per_cpu_s"], 3),
                                 "bulk_via_server_vs_server_loop": round(
                                     results["bulk_via_server"]["items_per_cpu_s"]
                                     / results["server_loop"]["items_per_cpu_s"], 3)}
        if "ray" in parts:
            replicas = [int(r) for r in args.replicas.split(",")]
            results["ray"] = ray_replicas(corpus, str(model_path), work, replicas)
            if {"1", "2"} <= set(results["ray"]):
                results.setdefault("ratios", {})["ray_2_vs_1"] = round(
                    results["ray"]["2"]["job_items_per_s"] / results["ray"]["1"]["job_items_per_s"], 3)
        if "memory" in parts and args.memory:
            results["memory"] = memory([int(n) for n in args.memory.split(",")], str(model_path), args.threads, work)
    results["load_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(results, indent=1))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.write_docs:
        report.write_doc_sections(report.bulk_sections(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
