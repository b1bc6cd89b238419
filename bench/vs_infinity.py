"""d2v against infinity-emb on the same random base text model, driven by the same load generator.

    .venv/bin/python -m bench.vs_infinity                       # c32, text-12 and text-128, every engine
    .venv/bin/python -m bench.vs_infinity --concurrency 1,32 --duration 20 --engines torch,optimum

1. Makes infinity-emb's own venv (runs/infinity-venv: `pip install infinity-emb[server,torch,optimum]` with
   `torch==2.13.0` in the same command, so no CUDA build is pulled) unless it exists.
2. Builds a random base Data2VecText model in the transformers layout (config.json + safetensors + a RoBERTa BPE
   tokenizer; tests/hf_models.py) and imports it with `d2v-import-hf`, then `d2v-export` (fp32 and --int8).
3. Serves that folder with infinity (`infinity_emb v2`, one engine at a time: torch, optimum = ONNX Runtime via
   Optimum, torch with --dtype int8) and drives its OpenAI `/embeddings` over HTTP; then serves d2v's exports
   and drives its gRPC `Embed`. The load generator is bench/loadgen.py in both cases (closed loop, one distinct
   text per call, run as its own process); the inputs are identical.
Prints a table and writes JSON (runs/bench/vs-infinity-TIME.json unless --json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

from bench.report import markdown_table  # noqa: E402
from bench.server import D2vServer, free_port, rss_mb, run_loadgen  # noqa: E402
from bench.stats import ratio  # noqa: E402

# torch is pinned in the same command so that no CUDA build is pulled. This resolves to Optimum 2 (Optimum 1.x
# does not import with torch 2.13).
REQUIREMENTS = ["infinity-emb[server,torch,optimum]==0.0.78", "torch==2.13.0"]
# engine name -> infinity_emb v2 flags
ENGINES = {"torch": ["--engine", "torch"], "optimum": ["--engine", "optimum"],
           "optimum-opt": ["--engine", "optimum", "--no-onnx-disable-optimize"],
           "torch-int8": ["--engine", "torch", "--dtype", "int8"]}
SIZES = {"base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      max_position_embeddings=514),
         "tiny": dict(max_position_embeddings=514)}  # tests/hf_models.py's 3 x 32 model: for trying the script


def ensure_venv(venv: Path) -> Path:
    """infinity-emb's venv, made with the system Python (a few minutes) unless it holds REQUIREMENTS already."""
    stamp = venv / "d2v-bench-requirements.txt"
    if stamp.exists() and stamp.read_text().split() == REQUIREMENTS:
        return venv / "bin" / "infinity_emb"
    if not (venv / "bin" / "pip").exists():
        subprocess.run([shutil.which("python3") or "python3", "-m", "venv", str(venv)], check=True)
    print(f"vs-infinity: pip install {' '.join(REQUIREMENTS)} into {venv}", file=sys.stderr)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *REQUIREMENTS], check=True)
    stamp.write_text("\n".join(REQUIREMENTS) + "\n")
    return venv / "bin" / "infinity_emb"


def ensure_models(work: Path, size: str) -> tuple[Path, Path]:
    """(transformers-layout folder, folder with d2v's text.onnx and text-int8.onnx)."""
    work = work / size
    hf_dir, d2v_dir = work / "hf-text", work / "d2v"
    if not (hf_dir / "config.json").exists():
        from tests.hf_models import hf_text

        hf_text(hf_dir, **SIZES[size])
        # infinity (transformers' tokenizer) cuts at model_max_length: allow the model's 512 tokens
        (hf_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    d2v_dir.mkdir(parents=True, exist_ok=True)
    ckpt = work / "text.pt"
    bin_dir = Path(sys.executable).parent
    if not ckpt.exists():
        subprocess.run([str(bin_dir / "d2v-import-hf"), str(hf_dir), "-o", str(ckpt)], check=True)
    for name, flags in (("text", []), ("text-int8", ["--int8"])):
        if not (d2v_dir / f"{name}.onnx").exists():
            subprocess.run([str(bin_dir / "d2v-export"), str(ckpt), "-o", str(d2v_dir / f"{name}.onnx"), "-q",
                            *flags], check=True, stdout=subprocess.DEVNULL)
    return hf_dir, d2v_dir


def ensure_onnx(venv: Path, hf_dir: Path) -> None:
    """infinity's optimum engine loads an ONNX file from the model folder: export one with Optimum (its venv).

    infinity 0.0.78 passes Optimum the file's path as found under --model-id, and Optimum 2 matches it against
    bare file names: so the file lies at the top of the folder and infinity runs in it with `--model-id .`."""
    if (hf_dir / "model.onnx").exists():
        return
    print("vs-infinity: exporting the model to ONNX with optimum-cli for infinity's optimum engine", file=sys.stderr)
    out = hf_dir / "optimum-export"
    subprocess.run([str(venv / "bin" / "optimum-cli"), "export", "onnx", "--model", str(hf_dir), "--task",
                    "feature-extraction", str(out)], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    for f in out.glob("model.onnx*"):  # the graph (and external weights, if any)
        f.rename(hf_dir / f.name)
    shutil.rmtree(out)


class InfinityServer:
    """`infinity_emb v2` on one model folder and engine, on loopback; offline, no telemetry."""

    def __init__(self, exe: Path, model_dir: Path, engine: str, start_timeout: float = 900.0) -> None:
        self.port = free_port()
        self.model_dir = model_dir
        self.command = [str(exe), "v2", "--model-id", ".", "--served-model-name", "text",
                        "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu", "--log-level", "warning",
                        *ENGINES[engine]]
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.cold_start_s = float("nan")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/embeddings"

    def __enter__(self) -> InfinityServer:
        env = {**os.environ, "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1"}
        start = time.perf_counter()
        self.log = tempfile.TemporaryFile("w+")  # not a pipe: a chatty server must never block on it
        self.proc = subprocess.Popen(self.command, env=env, cwd=self.model_dir, stdout=self.log, stderr=self.log,
                                     text=True)
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:  # not listening yet (URLError, connection refused or reset)
                pass
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"infinity exited with {self.proc.returncode}: "
                                   f"{' '.join(self.log.read().split())[-600:]}")
            if time.perf_counter() - start > self.start_timeout:
                self.__exit__()
                raise RuntimeError(f"infinity not healthy after {self.start_timeout:.0f} s")
            time.sleep(0.2)
        self.cold_start_s = time.perf_counter() - start
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def summary_rows(results: dict[str, Any]) -> list[list[Any]]:
    """One row per (workload, concurrency): every server's items/s and d2v over infinity's best."""
    rows = []
    for key in results["keys"]:
        by = {name: side.get(key, {}).get("items_per_s") for name, side in results["servers"].items()}
        fp32_engines = [v for n, v in by.items() if n.startswith("infinity") and "int8" not in n and v]
        any_engines = [v for n, v in by.items() if n.startswith("infinity") and v]
        best, best_any = max(fp32_engines, default=None), max(any_engines, default=None)
        rows.append([key, *by.values(), ratio(by.get("d2v fp32"), best), ratio(by.get("d2v fp32 HTTP"), best),
                     ratio(by.get("d2v int8"), best), ratio(by.get("d2v int8"), best_any)])
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", default="torch,optimum,optimum-opt,torch-int8", help=f"of {', '.join(ENGINES)}")
    p.add_argument("--workloads", default="text-12,text-128")
    p.add_argument("--concurrency", default="32")
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--size", default="base", choices=sorted(SIZES), help="of the random text model")
    p.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "vs-infinity")
    p.add_argument("--venv", type=Path, default=ROOT / "runs" / "infinity-venv")
    p.add_argument("--http", action=argparse.BooleanOptionalAction, default=True,
                   help="also drive d2v over HTTP (/v1/embeddings), as infinity is")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if any(e not in ENGINES for e in engines):
        print(f"vs-infinity: --engines takes {', '.join(ENGINES)}", file=sys.stderr)
        return 2
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if any(w not in ("text-12", "text-128") for w in workloads):
        print("vs-infinity: --workloads takes text-12, text-128", file=sys.stderr)
        return 2
    levels = sorted({int(c) for c in args.concurrency.split(",")})

    exe = ensure_venv(args.venv)
    hf_dir, d2v_dir = ensure_models(args.work_dir, args.size)
    if any(e.startswith("optimum") for e in engines):
        ensure_onnx(args.venv, hf_dir)
    model_file = d2v_dir / "text.onnx"
    keys = [f"{w} c{c}" for w in workloads for c in levels]
    results: dict[str, Any] = {"command": "bench/vs_infinity.py " + " ".join(argv or sys.argv[1:]), "keys": keys,
                               "servers": {}, "cold_start_s": {}, "rss": {}, "errors": {}}

    def drive(name: str, target: str, http: bool, model: str = "text", metrics: str = "") -> dict[str, Any]:
        out = {}
        for w in workloads:
            for c in levels:
                print(f"[{time.strftime('%H:%M:%S')}] {name}: {w}, {c} client(s)", file=sys.stderr, flush=True)
                out[f"{w} c{c}"] = run_loadgen(target, model, model_file, w, c, args.duration, args.warmup,
                                               min_items=c, metrics_url=metrics, http=http)
        return out

    for engine in engines:
        name = f"infinity {engine}"
        try:
            with InfinityServer(exe, hf_dir, engine) as server:
                results["cold_start_s"][name] = round(server.cold_start_s, 2)
                results["servers"][name] = drive(name, server.url, http=True)
                results["rss"][name] = rss_mb(server.proc.pid)
        except RuntimeError as exc:  # an engine that does not start is reported, the others still run
            results["errors"][name] = " ".join(str(exc).split())[:600]
            print(f"vs-infinity: {name}: {results['errors'][name]}", file=sys.stderr)
    for name, file in (("d2v fp32", model_file), ("d2v int8", d2v_dir / "text-int8.onnx")):
        with D2vServer([file], ["--device", "cpu"]) as server:
            results["cold_start_s"][name] = round(server.cold_start_s, 2)
            results["servers"][name] = drive(name, server.target, http=False, model=file.stem,
                                             metrics=server.metrics_url)
            if args.http:  # the same server over its OpenAI-compatible HTTP route, as infinity is driven
                route = server.http_url + "/v1/embeddings"
                results["servers"][f"{name} HTTP"] = drive(f"{name} HTTP", route, http=True, model=file.stem,
                                                           metrics=server.metrics_url)
            results["rss"][name] = server.memory()
    names = list(results["servers"])
    table = markdown_table(["workload", *[f"{n} items/s" for n in names], "d2v fp32 / infinity best fp32",
                            "d2v fp32 HTTP / infinity best fp32", "d2v int8 / infinity best fp32",
                            "d2v int8 / infinity best (any)"],
                           summary_rows(results))
    extra = markdown_table(["server", "cold start s", "RSS MiB"],
                           [[n, results["cold_start_s"].get(n), results["rss"].get(n, {}).get("rss_mb")]
                            for n in names])
    print(table + "\n\n" + extra + "\n")
    for name, error in results["errors"].items():
        print(f"{name}: not measured: {error}\n")
    out = args.json or ROOT / "runs" / "bench" / f"vs-infinity-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results in {os.path.relpath(out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
