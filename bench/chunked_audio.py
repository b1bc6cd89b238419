"""A long recording embedded in one chunked request vs its windows sent as separate requests, in one run.

    .venv/bin/python -m bench.chunked_audio                       # 10 min, tiny random audio model, 3 rounds
    .venv/bin/python -m bench.chunked_audio --preset small --minutes 10 --rounds 3

It starts the real `d2v-serve` on a random-weight audio model (bench.models; built once) and embeds a --minutes
recording (a tone in noise, 16 kHz PCM) three ways, alternating for --rounds rounds and reporting the best of each
(a shared machine only ever slows a side down), wall time and the server process's CPU seconds (steadier on a busy
machine):
- chunked: one Embed call with options.chunking (the model's default window, 1 s overlap), mean pooled;
- separate, concurrent: the same windows (the server's own plan, cut here) as one Embed call each, all in flight at
  once from a thread pool, mean pooled, joined by the client (length-weighted mean of window means);
- separate, sequential: the same calls one after another.
The separate calls' window means, weighted by the positions the chunked join keeps from each window, come close to
the chunked result (cosine reported) but not exactly: a window's mean covers its overlaps too.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from bench.models import DEFAULT_DIR, ensure_models
from bench.report import check_doc_sections, markdown_table, write_doc_sections
from bench.server import D2vServer
from d2v_serve.client import Client, Pcm
from d2v_serve.core.chunking import DEFAULT_AUDIO_OVERLAP_S, audio_windows
from d2v_serve.models.model_file import read_metadata

RATE = 16000


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def recording(minutes: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(minutes * 60 * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=("tiny", "small", "base"))
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=16, help="client threads for the separate concurrent calls")
    p.add_argument("--models-dir", type=Path, default=DEFAULT_DIR)
    p.add_argument("--server-args", default="", help="extra d2v-serve flags")
    p.add_argument("--json", type=Path, help="also write the result here")
    p.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = p.parse_args(argv)
    if args.write_docs:
        check_doc_sections(["chunked_audio"])

    directory = ensure_models(["audio"], args.preset, args.models_dir)
    model_file = directory / "audio.onnx"
    meta = read_metadata(model_file)
    samples = recording(args.minutes)
    server_args = ["--max-chunked-audio-seconds", str(args.minutes * 60 + 1), *args.server_args.split()]
    with D2vServer([model_file], server_args) as server, Client(server.target, timeout=3600) as client:
        info = client.describe_model("audio")
        window_s = info["chunk_window"]
        windows = audio_windows(len(samples), int(window_s * RATE), int(DEFAULT_AUDIO_OVERLAP_S * RATE),
                                meta.conv_layers)
        pieces = [samples[w.start: w.end] for w in windows]
        kept = np.array([w.keep[1] - w.keep[0] for w in windows], dtype=np.float64)

        def chunked() -> np.ndarray:
            return client.embed(Pcm(samples, RATE), "audio", chunk=True)

        def separate_concurrent() -> list[np.ndarray]:
            with concurrent.futures.ThreadPoolExecutor(args.threads) as pool:
                return list(pool.map(lambda x: client.embed(Pcm(x, RATE), "audio"), pieces))

        def separate_sequential() -> list[np.ndarray]:
            return [client.embed(Pcm(x, RATE), "audio") for x in pieces]

        client.embed(Pcm(pieces[0], RATE), "audio")  # warm the connection
        best = {"chunked": np.inf, "separate_concurrent": np.inf, "separate_sequential": np.inf}
        server_cpu = dict.fromkeys(best, np.inf)
        results: dict[str, object] = {}
        for _ in range(args.rounds):
            for name, fn in (("chunked", chunked), ("separate_concurrent", separate_concurrent),
                             ("separate_sequential", separate_sequential)):
                cpu = cpu_seconds(server.proc.pid)
                start = time.perf_counter()
                results[name] = fn()
                best[name] = min(best[name], time.perf_counter() - start)
                server_cpu[name] = min(server_cpu[name], cpu_seconds(server.proc.pid) - cpu)
    joined = np.asarray(results["chunked"])
    # Separate calls give each window's mean over all its frames, not over its kept frames: their weighted mean is
    # close to, not equal to, the chunked join (which is exact); report how close.
    window_means = np.stack(results["separate_concurrent"])
    approx = (window_means * kept[:, None]).sum(axis=0) / kept.sum()
    cosine = float(joined @ approx / (np.linalg.norm(joined) * np.linalg.norm(approx)))
    report = {
        "preset": args.preset, "minutes": args.minutes, "window_s": window_s, "overlap_s": DEFAULT_AUDIO_OVERLAP_S,
        "windows": len(windows), "rounds": args.rounds, "threads": args.threads,
        "seconds": {k: round(v, 3) for k, v in best.items()},
        "server_cpu_seconds": {k: round(v, 2) for k, v in server_cpu.items()},
        "chunked_speedup_vs_concurrent": round(best["separate_concurrent"] / best["chunked"], 3),
        "chunked_speedup_vs_sequential": round(best["separate_sequential"] / best["chunked"], 3),
        "cosine_chunked_vs_client_join": round(cosine, 6),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "command": " ".join([Path(sys.executable).name, "-m", "bench.chunked_audio", *(argv or sys.argv[1:])]),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if args.write_docs:
        write_doc_sections({"chunked_audio": chunked_table(best, server_cpu, len(windows), args.minutes)})
    return 0


def chunked_table(seconds: dict[str, float], server_cpu: dict[str, float], windows: int, minutes: float) -> str:
    def ratio_row(label: str, other: str) -> list[str]:
        return [f"**chunked / {label}**", f"**{seconds[other] / seconds['chunked']:.2f}x the speed**",
                f"{server_cpu['chunked'] / server_cpu[other]:.2f}"]

    return markdown_table(
        [f"{minutes:g} min of audio as", "wall s", "server CPU s"],
        [[f"one chunked `Embed` call ({windows} windows)", f"{seconds['chunked']:.1f}", f"{server_cpu['chunked']:.2f}"],
         [f"{windows} separate calls, all in flight", f"{seconds['separate_concurrent']:.1f}",
          f"{server_cpu['separate_concurrent']:.2f}"],
         [f"{windows} separate calls, one after another", f"{seconds['separate_sequential']:.1f}",
          f"{server_cpu['separate_sequential']:.2f}"],
         ratio_row("separate in flight", "separate_concurrent"),
         ratio_row("separate one by one", "separate_sequential")])


if __name__ == "__main__":
    raise SystemExit(main())
