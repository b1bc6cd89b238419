"""Checkpoint -> verified ONNX model file: export, verify against torch, make the variant, describe, write atomically.

Nothing is written at the output path unless every check passed: the file is built under a temporary name in the
output folder and renamed over the target at the end.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from d2v.training.checkpoint import encoder_config, load_checkpoint, load_encoder

from . import metadata, variants
from . import verify as V
from .graph import OPSET, ExportError, clean, export_graph, graph_module
from .samples import shape_of, verification_inputs

TOLERANCE = 1e-4  # fp32 (and fused fp32): max abs diff on valid positions, both hidden-state outputs
MIN_COSINE = {"fp16": 0.999, "int8": 0.99}
TOLERANCE_ENV = "D2V_EXPORT_TOLERANCE"

Progress = Callable[[str], None]


class ParityError(ExportError):
    """The exported graph does not compute what the torch model computes; the message carries the figures."""


def default_tolerance() -> float:
    value = os.environ.get(TOLERANCE_ENV)
    if value is None:
        return TOLERANCE
    try:
        return float(value)
    except ValueError:
        raise ExportError(f"{TOLERANCE_ENV}={value!r} is not a number") from None


def _figures(result: dict[str, Any]) -> str:
    d = result["max_abs_diff"]
    return (f"max abs diff last_hidden_state {d['last_hidden_state']:.3g}, target_hidden_state "
            f"{d['target_hidden_state']:.3g}; cosine {result['cosine']:.6f}; output_mask "
            f"{'equal' if result['output_mask_equal'] else 'DIFFERS'}")


def _check(what: str, result: dict[str, Any], *, tolerance: float | None = None,
           min_cosine: float | None = None) -> dict[str, Any]:
    failures = []
    if not result["output_mask_equal"]:
        failures.append("output_mask differs from torch")
    if not result["finite"]:
        failures.append("non-finite outputs")
    if tolerance is not None and V.worst_diff(result) > tolerance:
        failures.append(f"max abs diff {V.worst_diff(result):.3g} > tolerance {tolerance:g}")
    if min_cosine is not None and result["cosine"] < min_cosine:
        failures.append(f"cosine {result['cosine']:.6f} < {min_cosine}")
    if failures:
        raise ParityError(f"parity check failed ({what}): {'; '.join(failures)} [{_figures(result)}]")
    return result


def _session_or_none(model: bytes, provider: str) -> tuple[ort.InferenceSession | None, str]:
    """A session whose first provider really is `provider`, or None and why not."""
    if provider not in ort.get_available_providers():
        return None, f"{provider} not in this onnxruntime build"
    if provider == V.CUDA and not any(Path("/dev").glob("nvidia[0-9]*")):
        return None, "no NVIDIA GPU on this machine"
    ort.set_default_logger_severity(4)  # a CUDA EP that cannot start logs errors; get_providers() tells us
    try:
        sess = V.session(model, provider)
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types per failure
        return None, f"{provider} cannot load the graph ({str(e).strip().splitlines()[0][:200]})"
    finally:
        ort.set_default_logger_severity(2)
    if sess.get_providers()[0] != provider:
        return None, f"{provider} did not start (CUDA / cuDNN libraries missing?)"
    return sess, ""


def _verify_fp16(model: onnx.ModelProto, kept: set[str], batches: list, reference: list, pooled_target: bool,
                 progress: Progress) -> dict[str, Any]:
    problems = variants.fp16_graph_problems(model, kept)
    if problems:
        raise ParityError(f"fp16 graph check failed: {'; '.join(problems)}")
    data = model.SerializeToString()
    report: dict[str, Any] = {"graph": "ok", "float32_nodes": len(kept),
                              "initializers": variants.initializer_types(model)}
    ran = []
    for provider in (V.CUDA, V.CPU):
        sess, why = _session_or_none(data, provider)
        if sess is None:
            if provider == V.CUDA:
                report["cuda"] = f"not checked: {why}"
                progress(f"fp16: no CUDA GPU here ({why}); checking on CPU")
            elif ran:  # a CPU build without float16 kernels: the CUDA check stands
                report["cpu"] = f"not checked: {why}"
            else:
                raise ParityError(f"fp16 graph does not load in onnxruntime: {why}")
            continue
        progress(f"verifying fp16 on {provider}")
        label = "cuda" if provider == V.CUDA else "cpu"
        report[label] = V.rounded(_check(f"fp16 on {provider}", V.compare(reference, V.run(sess, batches),
                                                                            pooled_target),
                                         min_cosine=MIN_COSINE["fp16"]))
        ran.append(label)
    report["checked_on"] = ran
    return report


def export_model(ckpt_path: str | Path, out_path: str | Path, *, fp16: bool = False, int8: bool = False,
                 fuse: bool = True, progress: Progress | None = None, tolerance: float | None = None,
                 opset: int = OPSET) -> dict[str, Any]:
    """Export a d2v checkpoint to one verified, self-describing ONNX file at `out_path`; returns the report.

    Raises CheckpointError (unusable checkpoint), ExportError (the exporter failed) or ParityError (a check
    failed); in every failure case nothing is left at `out_path` or beside it.
    """
    if fp16 and int8:
        raise ExportError("choose one of fp16 and int8")
    if opset < OPSET:
        raise ExportError(f"opset {opset} is below {OPSET}, the lowest torch's dynamo exporter writes")
    say = progress or (lambda _msg: None)
    tolerance = default_tolerance() if tolerance is None else tolerance
    started = time.perf_counter()
    ckpt_path, out_path = Path(ckpt_path), Path(out_path)
    if out_path.is_dir():
        raise ExportError(f"{out_path} is a directory; give the model file's path")

    say(f"loading {ckpt_path}")
    ckpt = load_checkpoint(ckpt_path)
    cfg = encoder_config(ckpt)
    module = graph_module(load_encoder(ckpt), cfg)
    sha = metadata.sha256_file(ckpt_path)
    say(f"exporting {cfg.modality} encoder ({cfg.num_layers} layers x {cfg.hidden_size}) with torch.onnx "
        f"(dynamo, opset {opset})")
    model = export_graph(module, cfg, opset)
    opset_used = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if fuse:
        say("fusing attention, GELU and residual layer norms into onnxruntime's contrib ops")
        model = variants.fuse(model)
        clean(model, cfg.modality)

    batches = verification_inputs(cfg, ckpt["preprocessing"])
    shapes = [shape_of(b) for b in batches]
    pooled_target = metadata.pooled_target(cfg)
    say(f"verifying fp32 against torch on CPUExecutionProvider, shapes {shapes}")
    reference = V.torch_reference(module, batches)
    fp32 = _check("fp32", V.compare(reference, V.run(V.session(model.SerializeToString()), batches),
                                    pooled_target), tolerance=tolerance)
    parity: dict[str, Any] = {
        "reference": "torch fp32 (eager attention)", "graph": "fused" if fuse else "plain", "provider": V.CPU,
        "shapes": shapes, "tolerance": tolerance,
        "min_cosine": MIN_COSINE, "cosine_definition": "pooled over valid positions" + (
            "" if pooled_target else "; target_hidden_state: whole item (its mean over time is zero)"),
        "fp32": V.rounded(fp32),
    }

    precision = "fp32"
    if int8:
        precision = "int8"
        say("quantizing MatMul weights to int8 (dynamic quantization)")
        model = variants.to_int8(model)
        say("verifying int8 on CPUExecutionProvider")
        result = V.compare(reference, V.run(V.session(model.SerializeToString()), batches), pooled_target)
        parity["int8"] = V.rounded(_check("int8", result, min_cosine=MIN_COSINE["int8"]))
    elif fp16:
        precision = "fp16"
        say("converting to fp16 (float32 inputs/outputs, mask arithmetic and target head)")
        model, kept = variants.to_fp16(model)
        parity["fp16"] = _verify_fp16(model, kept, batches, reference, pooled_target, say)

    say("counting fused nodes (in the file, and in onnxruntime's optimized CPU session)")
    parity["fused_nodes"] = {"in_file": variants.fused_nodes(model),
                             "onnxruntime_cpu": variants.session_fused_nodes(model)}
    meta = metadata.build_metadata(ckpt, cfg, precision=precision, checkpoint=ckpt_path, checkpoint_sha256=sha,
                                   opset=opset_used, parity=parity)
    metadata.attach(model, meta)
    size = _write_atomic(model, out_path)
    seconds = time.perf_counter() - started
    report = {"path": str(out_path), "modality": cfg.modality, "precision": precision, "fused": fuse,
              "size_bytes": size, "export_seconds": round(seconds, 2), "parity": parity, "metadata": meta.to_dict()}
    report["summary"] = summary_line(report)
    return report


def _write_atomic(model: onnx.ModelProto, out_path: Path) -> int:
    data = model.SerializeToString()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(data)


def summary_line(report: dict[str, Any]) -> str:
    parity = report["parity"]
    fp32 = parity["fp32"]
    parts = [f"exported {report['modality']} {report['precision']}{'' if report['fused'] else ' unfused'} "
             f"-> {report['path']}", f"{report['size_bytes'] / 1e6:.2f} MB", f"{report['export_seconds']:.1f} s",
             f"fp32 max diff {max(fp32['max_abs_diff'].values()):.2g} (tol {parity['tolerance']:g})",
             f"cosine {fp32['cosine']:.6f}"]
    fused = parity["fused_nodes"]["onnxruntime_cpu"]
    if isinstance(fused, dict):
        parts.append("fused " + (", ".join(f"{op} x{n}" for op, n in fused.items() if n) or "nothing"))
    if "int8" in parity:
        parts.append(f"int8 cosine {parity['int8']['cosine']:.6f}")
    if "fp16" in parity:
        fp16 = parity["fp16"]
        for label in ("cuda", "cpu"):
            if isinstance(fp16.get(label), dict):
                parts.append(f"fp16 cosine {fp16[label]['cosine']:.6f} ({label.upper()})")
        if "cuda" not in fp16.get("checked_on", []):
            parts.append("fp16 not checked on GPU (no CUDA device)")
    return "; ".join(parts)
