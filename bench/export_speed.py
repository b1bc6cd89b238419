"""Export a random-weight preset model to fp32 and int8 and time ONNX Runtime (CPU) against torch eager.

    .venv/bin/python -m bench.export_speed --modality audio --preset base --batch 8 --length 80000

Prints the export reports' figures (time, size, max diff, cosine) and the median latency per run of one batch.
`--length`: samples (audio) or tokens (text); images use the model's size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort
import torch

from bench.engines import batch_inputs, median_seconds  # noqa: E402
from bench.models import write_checkpoint  # noqa: E402
from d2v.export import export_model  # noqa: E402
from d2v.export.graph import graph_module  # noqa: E402
from d2v.training.checkpoint import load_checkpoint, load_encoder  # noqa: E402
from d2v.training.models import EncoderConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modality", choices=["audio", "image", "text"], default="audio")
    parser.add_argument("--preset", choices=["tiny", "small", "base"], default="base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=80000)
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: all cores)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="d2v-bench-") as tmp:
        ckpt_path = write_checkpoint(args.modality, args.preset, Path(tmp))
        ckpt = load_checkpoint(ckpt_path)
        module = graph_module(load_encoder(ckpt), EncoderConfig.from_dict(ckpt["config"]))
        inputs = batch_inputs(module.cfg, args.batch, args.length)
        results = {}
        for precision in ("fp32", "int8"):
            report = export_model(ckpt_path, Path(tmp) / f"{precision}.onnx", int8=precision == "int8",
                                  progress=lambda m: print(f"  {m}", file=sys.stderr))
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads
            sess = ort.InferenceSession(report["path"], opts, providers=["CPUExecutionProvider"])
            seconds = median_seconds(lambda s=sess: s.run(None, inputs), args.repeat)
            parity = report["parity"][precision]
            results[precision] = {
                "export_s": report["export_seconds"], "size_mb": round(report["size_bytes"] / 1e6, 2),
                "max_abs_diff": max(parity["max_abs_diff"].values()), "cosine": parity["cosine"],
                "latency_s": round(seconds, 4),
            }
        with torch.no_grad():
            tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
            results["torch_eager"] = {"latency_s": round(median_seconds(lambda: module(**tensors), args.repeat), 4)}
    fp32 = results["fp32"]["latency_s"]
    results["int8_speedup_vs_fp32"] = round(fp32 / results["int8"]["latency_s"], 2)
    results["ort_fp32_speedup_vs_torch"] = round(results["torch_eager"]["latency_s"] / fp32, 2)
    shape = {k: list(v.shape) for k, v in inputs.items()}
    print(json.dumps({"modality": args.modality, "preset": args.preset, "inputs": shape, "threads": args.threads,
                      "torch_threads": torch.get_num_threads(), **results}, indent=2))


if __name__ == "__main__":
    main()
