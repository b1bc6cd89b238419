"""A `d2v-serve` process for the bench: start it on chosen model files, time its cold start, read its memory and
its batch metrics, stop it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.stats import Histogram, counters, gauges, histograms


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> dict[str, float]:
    """Resident memory of a process now and at its peak, in MiB (Linux /proc; empty elsewhere)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out["rss_mb" if key == "VmRSS" else "peak_rss_mb"] = round(int(value.split()[0]) / 1024, 1)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def inputs_done(metrics_page: str, model: str) -> float:
    """Inputs the server has run through `model` (the sum of its d2v_batch_size histogram: inputs of cancelled
    calls that ran included, since their CPU time is)."""
    sizes = histograms(metrics_page, "d2v_batch_size").get(model)
    return float(sizes.total) if sizes is not None else 0.0


def queue_depth(metrics_page: str, model: str) -> float:
    """Inputs admitted by the server and not yet in a batch (d2v_queue_depth)."""
    return sum(v for k, v in gauges(metrics_page, "d2v_queue_depth").items() if dict(k).get("model") == model)


def batch_stats(before: str, after: str, model: str) -> dict[str, Any]:
    """Batch sizes and padding of `model` between two scrapes of a d2v server's /metrics page."""
    sizes = histograms(after, "d2v_batch_size").get(model)
    if sizes is None:
        return {}
    sizes = sizes - histograms(before, "d2v_batch_size").get(model, Histogram({}))
    out: dict[str, Any] = {"batches": int(sizes.count), "mean_batch": round(sizes.mean, 2),
                           "batch_sizes": sizes.counts()}
    pad = histograms(after, "d2v_batch_padding_fraction").get(model)
    if pad is not None:
        pad = pad - histograms(before, "d2v_batch_padding_fraction").get(model, Histogram({}))
        out["padded_fraction_per_batch"] = round(pad.mean, 4)
    # Servers that count positions give the padded share of all computed positions (batches weighted by size).
    positions = {k: v - counters(before, "d2v_batch_positions").get(k, 0.0)
                 for k, v in counters(after, "d2v_batch_positions").items() if dict(k).get("model") == model}
    valid = sum(v for k, v in positions.items() if dict(k).get("kind") == "valid")
    padded = sum(v for k, v in positions.items() if dict(k).get("kind") == "padded")
    if valid + padded > 0:
        out["padded_fraction"] = round(padded / (valid + padded), 4)
    busy = {k: v for k, v in counters(after, "d2v_session_busy_seconds").items() if dict(k).get("model") == model}
    if busy:
        key = next(iter(busy))
        out["session_busy_s"] = round(busy[key] - counters(before, "d2v_session_busy_seconds").get(key, 0.0), 3)
    return out


class D2vServer:
    """`d2v-serve` on a few model files (a temporary folder of links), bound to loopback. A context manager."""

    def __init__(self, model_files: Sequence[Path], extra_args: Sequence[str] = (), start_timeout: float = 600.0,
                 executable: str | None = None, cpus: str = "") -> None:
        """`cpus`: pin the server to these CPUs (taskset -c), e.g. '0' or '0,1'."""
        self.cpus = cpus
        self.model_files = [Path(f).resolve() for f in model_files]
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        self.executable = executable or str(Path(sys.executable).with_name("d2v-serve"))
        self.port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.proc: subprocess.Popen | None = None
        self.cold_start_s = float("nan")
        self._dir: tempfile.TemporaryDirectory | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def command(self) -> list[str]:
        models = self._dir.name if self._dir else "MODELS"
        return [self.executable, "--models", models, "--host", "127.0.0.1", "--port", str(self.port),
                "--http-port", str(self.http_port), "--metrics-port", str(self.metrics_port), "--log-level", "warning",
                *self.extra_args]

    def __enter__(self) -> D2vServer:
        from d2v_serve.client import Client

        self._dir = tempfile.TemporaryDirectory(prefix="d2v-bench-models-")
        for f in self.model_files:
            (Path(self._dir.name) / f.name).symlink_to(f)
        start = time.perf_counter()
        pin = ["taskset", "-c", self.cpus] if self.cpus else []
        self.proc = subprocess.Popen(pin + self.command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = start + self.start_timeout
        while True:  # cold start: process start to health SERVING (models loaded and warmed up)
            try:
                with Client(self.target, timeout=2) as client:
                    if client.health() == "SERVING":
                        break
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"d2v-serve exited with {self.proc.returncode}: {' '.join(self.command)}")
            if time.perf_counter() > deadline:
                self.__exit__()
                raise RuntimeError(f"d2v-serve not SERVING after {self.start_timeout:.0f} s")
            time.sleep(0.05)
        self.cold_start_s = time.perf_counter() - start
        return self

    def usage(self, model: str, settle_s: float = 120.0) -> tuple[float, float]:
        """(CPU seconds the server has used, inputs it has run through `model`): per-item CPU cost from two. Read
        once the server is idle (no input queued, no batch finishing), so a batch still running when the load
        generator cancelled its last calls is counted with its CPU time, and it runs items whose calls are gone."""
        deadline = time.monotonic() + settle_s
        last = None
        while True:
            with urllib.request.urlopen(self.metrics_url, timeout=30) as reply:
                page = reply.read().decode()
            now = (inputs_done(page, model), queue_depth(page, model))
            if (now[1] == 0 and now == last) or time.monotonic() > deadline:
                return cpu_seconds(self.proc.pid), now[0]
            last = now
            time.sleep(0.2)

    def memory(self) -> dict[str, float]:
        return rss_mb(self.proc.pid) if self.proc else {}

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def run_loadgen(target: str, model: str, model_file: Path, workload: str, concurrency: int, duration: float,
                warmup: float, min_items: int = 0, metrics_url: str = "", http: bool = False, processes: int = 1,
                python: str | None = None, timeout: float = 900.0) -> dict[str, Any]:
    """bench.loadgen in `processes` processes of their own (the concurrency split among them, each with its own
    inputs); their JSON results, combined."""
    root = Path(__file__).resolve().parent.parent
    processes = max(1, min(processes, concurrency))
    procs = []
    for k in range(processes):
        share = concurrency // processes + (1 if k < concurrency % processes else 0)
        cmd = [python or sys.executable, "-m", "bench.loadgen", "--http" if http else "--grpc", target,
               "--model", model, "--model-file", str(model_file), "--workload", workload,
               "--concurrency", str(share), "--duration", str(duration), "--warmup", str(warmup),
               "--min-items", str(-(-min_items // processes)), "--seed", str(k)]
        if metrics_url and k == 0:
            cmd += ["--metrics", metrics_url]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"load generator failed ({proc.returncode}): {err.strip()[-500:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return combine_loads(results)


def combine_loads(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several load generator processes run at once: rates and counts add up, errors merge,
    p50 is the median of theirs and p99 the largest (an upper bound), server figures come from the first."""
    if len(results) == 1:
        return results[0]
    out = dict(results[0])
    for key in ("calls", "items", "items_per_s", "units_per_s", "distinct_inputs", "concurrency"):
        out[key] = round(sum(r[key] for r in results), 3)
    out["errors"] = {}
    for r in results:
        for k, v in r["errors"].items():
            out["errors"][k] = out["errors"].get(k, 0) + v
    out["p50_ms"] = float(np.median([r["p50_ms"] for r in results]))
    out["p99_ms"] = max(r["p99_ms"] for r in results)
    out["mean_ms"] = float(np.mean([r["mean_ms"] for r in results]))
    out["window_s"] = max(r["window_s"] for r in results)
    out["processes"] = len(results)
    return out
