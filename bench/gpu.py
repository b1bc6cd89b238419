"""The GPU run of issue 18, inside the venv that bench/gpu_check made: export, verify fp16 on CUDA, serve on CUDA,
drive each case with the bench's load generator, compare with raw ORT on the same GPU, smoke NCCL DDP training.

    bench/gpu_check            # the entry point: refuses without a GPU, makes the venv, then runs this module
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

from bench.report import markdown_number, markdown_table, met_label  # noqa: E402
from bench.stats import ratio  # noqa: E402

CUDA = "CUDAExecutionProvider"


@dataclass(frozen=True)
class Case:
    workload: str
    model: str  # bench model name: text-fp16, audio, ...


CASES = [Case("text-12", "text-fp16"), Case("text-128", "text-fp16"), Case("text-128", "text"),
         Case("audio-2s", "audio-fp16"), Case("audio-2s", "audio"), Case("audio-mixed", "audio-fp16"),
         Case("image", "image-fp16"), Case("image", "image")]


def parse_gpu_memory(csv: str) -> dict[int, int]:
    """nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits -> {pid: MiB}."""
    out = {}
    for line in csv.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            out[int(parts[0])] = int(parts[1])
    return out


def gpu_memory_mib(pid: int) -> int | None:
    """GPU memory held by process `pid` (nvidia-smi), None when unknown."""
    try:
        csv = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_gpu_memory(csv).get(pid)


def fp16_check(model_file: Path) -> dict[str, Any]:
    """The fp16 export's CUDA figures (pooled cosine vs torch fp32) and whether a CUDA session really runs it."""
    import onnxruntime as ort

    from d2v_serve.models.model_file import read_metadata

    fp16 = read_metadata(model_file).parity.get("fp16", {})
    cuda = fp16.get("cuda") if isinstance(fp16.get("cuda"), dict) else {}
    session = ort.InferenceSession(str(model_file), providers=[CUDA, "CPUExecutionProvider"])
    provider = session.get_providers()[0]
    cosine = cuda.get("cosine")
    return {"checked_on": fp16.get("checked_on", []), "cuda_cosine": cosine, "provider": provider,
            "ok": provider == CUDA and "cuda" in fp16.get("checked_on", []) and cosine is not None
            and cosine >= 0.999}


def case_row(case: Case, load: dict[str, Any], raw: list[dict[str, Any]], gpu_mib: int | None) -> dict[str, Any]:
    """One case's figures: items/s and units/s (tokens, audio seconds, images), batches, latency, vs raw ORT."""
    server = load.get("server", {})
    best = max(raw, key=lambda r: r["items_per_s"]) if raw else None
    return {"workload": case.workload, "model": case.model, "items_per_s": load.get("items_per_s"),
            "units_per_s": load.get("units_per_s"), "unit": load.get("unit"), "p50_ms": load.get("p50_ms"),
            "p99_ms": load.get("p99_ms"), "mean_batch": server.get("mean_batch"),
            "batch_sizes": server.get("batch_sizes"),
            "padded_fraction": server.get("padded_fraction", server.get("padded_fraction_per_batch")),
            "gpu_memory_mib": gpu_mib, "raw_ort": raw, "raw_ort_best": best,
            "server_over_raw": ratio(load.get("items_per_s"), best["items_per_s"] if best else None),
            "errors": load.get("errors", {})}


def fp16_speedups(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """items/s of each fp16 case over the fp32 case of the same workload."""
    by = {(r["workload"], r["model"].endswith("-fp16")): r["items_per_s"] for r in rows}
    return {w: ratio(by.get((w, True)), by.get((w, False))) for w, fp16 in by if not fp16 and (w, True) in by}


def goals(rows: list[dict[str, Any]], speedups: dict[str, float | None]) -> list[dict[str, Any]]:
    def row(workload: str, model: str) -> dict[str, Any]:
        return next((r for r in rows if r["workload"] == workload and r["model"] == model), {})

    out = [{"goal": "base text fp16 >= 400k tokens/s at 128 tokens",
            "value": row("text-128", "text-fp16").get("units_per_s"), "target": 400_000},
           {"goal": "base audio >= 5000 s of audio per second (fp16, 2 s clips)",
            "value": row("audio-2s", "audio-fp16").get("units_per_s"), "target": 5000}]
    out += [{"goal": f"server >= 0.90 x raw ORT ({r['workload']}, {r['model']})", "value": r["server_over_raw"],
             "target": 0.90} for r in rows]
    out += [{"goal": f"fp16 >= 2 x fp32 ({w})", "value": v, "target": 2.0} for w, v in speedups.items()]
    for g in out:
        g["met"] = None if g["value"] is None else g["value"] >= g["target"]
    return out


def render(results: dict[str, Any]) -> str:
    rows = [[r["workload"], r["model"], r["items_per_s"], f"{markdown_number(r['units_per_s'])} {r['unit']}",
             f"{markdown_number(r['p50_ms'])} / {markdown_number(r['p99_ms'])}", r["mean_batch"], r["padded_fraction"],
             r["gpu_memory_mib"],
             f"{markdown_number(r['raw_ort_best']['items_per_s'])} (b{r['raw_ort_best']['batch']})"
             if r.get("raw_ort_best") else "-", r["server_over_raw"]] for r in results["cases"]]
    parts = [markdown_table(["workload", "model", "items/s", "units/s", "p50/p99 ms", "mean batch", "padded",
                             "GPU MiB", "raw ORT best", "server/raw"], rows)]
    parts.append(markdown_table(["fp16 model", "provider", "CUDA pooled cosine vs torch fp32", "ok"],
                                [[k, v["provider"], v["cuda_cosine"], v["ok"]] for k, v in results["fp16"].items()]))
    if results.get("fp16_over_fp32"):
        parts.append(markdown_table(["workload", "fp16 / fp32 items/s"], list(results["fp16_over_fp32"].items())))
    ddp = results.get("ddp", {})
    parts.append(f"NCCL DDP smoke (torchrun, 1 GPU, d2v-train): {'ok' if ddp.get('ok') else 'FAILED'} "
                 f"({ddp.get('detail', '')})")
    parts.append(markdown_table(["goal", "value", "target", "met"],
                                [[g["goal"], g["value"], g["target"], met_label(g["met"])] for g in results["goals"]]))
    return "\n\n".join(parts) + "\n"


def ddp_smoke(work: Path, device: str = "cuda", steps: int = 5) -> dict[str, Any]:
    """A few d2v-train steps of a tiny text model through torchrun on one GPU (NCCL; gloo on CPU)."""
    from bench.workloads import WORDS

    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(" ".join(WORDS[i % len(WORDS):] + WORDS[:i % len(WORDS)]) for i in range(200)))
    out = work / "ddp-run"
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "1", "-m",
           "d2v.training.cli", "--modality", "text", "--data", str(corpus), "--preset", "tiny", "--steps", str(steps),
           "--out", str(out), "--device", device, "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    end = {}
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        end = next((x for x in reversed(lines) if x.get("event") == "end"), {})
    ok = done.returncode == 0 and bool(end.get("ranks_in_sync"))
    detail = f"exit {done.returncode}, {steps} steps" if ok else " ".join((done.stderr or "").split())[-400:]
    return {"ok": ok, "detail": detail, "command": " ".join(cmd)}


def main(argv: list[str] | None = None) -> int:
    from bench.engines import in_fresh_process, raw_ort
    from bench.models import ensure_models
    from bench.server import D2vServer, run_loadgen

    p = argparse.ArgumentParser(prog="bench.gpu")
    p.add_argument("--duration", type=float, default=25.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--clients", type=int, default=4, help="load generator processes (the concurrency is split)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-check")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: try the script without a GPU")
    p.add_argument("--preset", default="base", choices=("tiny", "small", "base"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    models = ensure_models(sorted({c.model for c in CASES}), args.preset)
    results: dict[str, Any] = {"cases": [], "fp16": {}}
    for name in sorted({c.model for c in CASES if c.model.endswith("-fp16")}):
        results["fp16"][name] = fp16_check(models / f"{name}.onnx")
    for model in dict.fromkeys(c.model for c in CASES):
        file = models / f"{model}.onnx"
        loads = {}
        with D2vServer([file], ["--device", args.device]) as server:
            for case in (c for c in CASES if c.model == model):
                print(f"[{time.strftime('%H:%M:%S')}] {case.workload} on {model}", file=sys.stderr, flush=True)
                loads[case] = run_loadgen(server.target, model, file, case.workload, args.concurrency, args.duration,
                                          5.0, min_items=args.concurrency, metrics_url=server.metrics_url,
                                          processes=args.clients)
            gpu_mib = gpu_memory_mib(server.proc.pid)
        for case, load in loads.items():
            batch = max(1, round(load.get("server", {}).get("mean_batch") or 1))
            raw = in_fresh_process(raw_ort, file, case.workload, sorted({batch, 64}), 5.0, 1, args.device,
                                   case.workload == "audio-mixed")
            results["cases"].append(case_row(case, load, raw, gpu_mib))
    results["fp16_over_fp32"] = fp16_speedups(results["cases"])
    with tempfile.TemporaryDirectory() as tmp:
        results["ddp"] = ddp_smoke(Path(tmp), args.device)
    results["goals"] = goals(results["cases"], results["fp16_over_fp32"])
    results["seconds"] = round(time.perf_counter() - begin, 1)
    text = render(results)
    print(text)
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (args.out / "gpu_check.md").write_text(text)
    ok = results["ddp"]["ok"] and all(v["ok"] for v in results["fp16"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
