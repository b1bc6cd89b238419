"""ONNX Runtime (CPU) on d2v-export's fused graph against torch eager, at equal threads, in one interleaved run.

    .venv/bin/python -m bench.graph_speed --modality text --batch 32 --length 128 --threads 1 2
    .venv/bin/python -m bench.graph_speed --modality audio --batch 8 --length 80000 --threads 1 2

Exports a random-weight preset model (fp32, int8, and with --unfused the plain graph too), then times one batch
per engine per round, engines interleaved within each round, and keeps the best of --repeat rounds (a shared,
noisy machine slows runs; it never speeds them up). ORT sessions use the server's session options. Prints one JSON
object: seconds per batch (wall, and the process's CPU time) and items/s per engine and thread count, ORT fp32 /
torch eager, int8 / fp32 (from both) with the pooled cosine of int8 against fp32, and the fused node counts from
the export report. `--profile` adds where the time goes: ORT's per-op-type share (its profiling JSON) and torch's
per-op share (torch.profiler), at one thread.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from bench.models import write_checkpoint  # noqa: E402
from d2v.export import export_model  # noqa: E402
from d2v.export.graph import graph_module  # noqa: E402
from d2v.export.verify import min_cosine  # noqa: E402
from d2v.training.checkpoint import load_checkpoint, load_encoder  # noqa: E402
from d2v.training.models import EncoderConfig  # noqa: E402
from d2v_serve.backend.runner import session_options  # noqa: E402
from d2v_serve.models.model_file import read_metadata  # noqa: E402
from d2v_serve.preprocess import masked_mean  # noqa: E402


def batch_inputs(cfg: EncoderConfig, batch: int, length: int, mixed: bool) -> dict[str, np.ndarray]:
    """Full-length items, or (mixed) lengths spread evenly from half to all of `length`, padded."""
    rng = np.random.default_rng(0)
    if cfg.modality == "image":
        return {"pixel_values": rng.standard_normal((batch, 3, cfg.image_size, cfg.image_size)).astype(np.float32)}
    lengths = np.linspace(length // 2, length, batch).astype(int) if mixed else np.full(batch, length)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    if cfg.modality == "audio":
        return {"input_values": (rng.standard_normal((batch, length)) * mask).astype(np.float32),
                "attention_mask": mask}
    ids = np.where(mask == 1, rng.integers(3, cfg.vocab_size, (batch, length)), cfg.pad_id).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask}


def ort_session(path: str, threads: int, profile_prefix: str | None = None) -> ort.InferenceSession:
    opts = session_options(threads)
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def ort_op_shares(profile_json: str) -> dict[str, float]:
    """Share of kernel time per op type, from ORT's profiling JSON."""
    totals: collections.Counter[str] = collections.Counter()
    for event in json.loads(Path(profile_json).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"]
    whole = sum(totals.values()) or 1
    return {op: round(100 * t / whole, 1) for op, t in totals.most_common(12)}


def torch_op_shares(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """Share of self CPU time per aten op, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(2):  # the first profile pays the profiler's own start-up; the second one counts
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                module(**tensors)
    totals = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    whole = sum(totals.values()) or 1
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:12]
    return {op: round(100 * t / whole, 1) for op, t in top}


def exported(ckpt_path: Path, path: Path, say, **kwargs: Any) -> dict[str, Any]:
    """The export report of `path`: from its metadata when the file is there already, else by exporting."""
    if path.exists():
        return {"path": str(path), "parity": read_metadata(path).parity}
    return export_model(ckpt_path, path, progress=say, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modality", choices=["audio", "image", "text"], default="text")
    parser.add_argument("--preset", choices=["tiny", "small", "base"], default="base")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128, help="tokens (text) or samples (audio)")
    parser.add_argument("--mixed", action="store_true", help="mixed lengths (half to full) instead of full ones")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds; the best round counts")
    parser.add_argument("--unfused", action="store_true", help="also time the plain (unfused) exported graph")
    parser.add_argument("--profile", action="store_true", help="per-op-type time shares, ORT and torch")
    parser.add_argument("--json", metavar="PATH", help="also write the result here")
    parser.add_argument("--workdir", metavar="DIR", help="keep the checkpoint and model files here and reuse those "
                                                         "already there (default: a temporary folder)")
    args = parser.parse_args()

    say = lambda m: print(f"  {m}", file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="d2v-bench-") as tmp:
        if args.workdir:
            tmp = args.workdir
            Path(tmp).mkdir(parents=True, exist_ok=True)
        ckpt_path = Path(tmp) / f"{args.modality}.pt"
        if not ckpt_path.exists():
            ckpt_path = write_checkpoint(args.modality, args.preset, Path(tmp))
        ckpt = load_checkpoint(ckpt_path)
        module = graph_module(load_encoder(ckpt), EncoderConfig.from_dict(ckpt["config"]))
        inputs = batch_inputs(module.cfg, args.batch, args.length, args.mixed)
        tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
        variants = [("ort_fp32", {}), ("ort_int8", {"int8": True})]
        if args.unfused:
            variants.append(("ort_fp32_unfused", {"fuse": False}))
        reports = {name: exported(ckpt_path, Path(tmp) / f"{name}.onnx", say, **kw) for name, kw in variants}

        result: dict[str, Any] = {
            "modality": args.modality, "preset": args.preset, "inputs": {k: list(v.shape) for k, v in inputs.items()},
            "lengths": "mixed" if args.mixed else "full", "repeat": args.repeat,
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads "
                       f"available", "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
            "fused_nodes": {name: r["parity"]["fused_nodes"] for name, r in reports.items()},
        }
        outputs: dict[str, np.ndarray] = {}
        for threads in args.threads:
            torch.set_num_threads(threads)
            sessions = {name: ort_session(r["path"], threads) for name, r in reports.items()}
            engines = {name: (lambda s=s: s.run(None, inputs)) for name, s in sessions.items()}
            engines["torch_eager"] = lambda: module(**tensors)
            best = dict.fromkeys(engines, float("inf"))
            best_cpu = dict.fromkeys(engines, float("inf"))  # process CPU time: what neighbours on a shared machine
            # cannot inflate as much as wall time (at 1 thread it is the engine's own work)
            with torch.no_grad():
                for name, run in engines.items():  # warm-up (ORT allocates, torch picks kernels)
                    out = run()
                    outputs[name] = out[0] if name != "torch_eager" else out[0].numpy()
                for round_ in range(args.repeat):
                    for name, run in engines.items():
                        start, cpu = time.perf_counter(), time.process_time()
                        run()
                        best[name] = min(best[name], time.perf_counter() - start)
                        best_cpu[name] = min(best_cpu[name], time.process_time() - cpu)
                    say(f"threads {threads} round {round_ + 1}: best "
                        + ", ".join(f"{k} {v:.3f}s" for k, v in best.items()))
            result[f"threads_{threads}"] = {
                "seconds_per_batch": {k: round(v, 4) for k, v in best.items()},
                "items_per_s": {k: round(args.batch / v, 2) for k, v in best.items()},
                "ort_fp32_over_torch_eager": round(best["torch_eager"] / best["ort_fp32"], 3),
                "int8_over_fp32": round(best["ort_fp32"] / best["ort_int8"], 3),
                "cpu_seconds_per_batch": {k: round(v, 4) for k, v in best_cpu.items()},
                "cpu_ort_fp32_over_torch_eager": round(best_cpu["torch_eager"] / best_cpu["ort_fp32"], 3),
                "cpu_int8_over_fp32": round(best_cpu["ort_fp32"] / best_cpu["ort_int8"], 3),
            }
            if args.unfused:
                result[f"threads_{threads}"]["fused_over_unfused"] = round(
                    best["ort_fp32_unfused"] / best["ort_fp32"], 3)
        valid = sessions["ort_fp32"].run(["output_mask"], inputs)[0]  # output positions that are real
        int8, fp32, eager = (masked_mean(outputs[n], valid) for n in ("ort_int8", "ort_fp32", "torch_eager"))
        result["int8_pooled_cosine_vs_fp32"] = round(min_cosine(int8, fp32), 6)
        result["fp32_pooled_cosine_vs_torch"] = round(min_cosine(fp32, eager), 6)
        diff = np.abs(outputs["ort_fp32"] - outputs["torch_eager"])[valid.astype(bool)].max()
        result["fp32_max_abs_diff_vs_torch"] = float(f"{diff:.3g}")
        if args.profile:
            torch.set_num_threads(1)
            sess = ort_session(reports["ort_fp32"]["path"], 1, str(Path(tmp) / "ort-profile"))
            sess.run(None, inputs)
            result["profile_1_thread"] = {"ort_fp32_op_share_pct": ort_op_shares(sess.end_profiling()),
                                          "torch_eager_op_share_pct": torch_op_shares(module, tensors)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
