"""Graph variants of a verified fp32 model: fp16 (GPU), int8 dynamic quantization (CPU), transformer fusions."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from training.models import EncoderConfig

from .fp16 import to_fp16  # noqa: F401 - re-exported: every variant lives here

OPTIMIZABLE = ("image", "text")  # post-LN / pre-LN BERT-like blocks; the audio front end is not a BERT


def fp16_graph_problems(model: onnx.ModelProto, kept_fp32: set[str]) -> list[str]:
    """What is wrong with an fp16 graph, as short strings (empty: fine): checker errors, float16 inputs/outputs,
    float32 initializers feeding float16 nodes, no float16 weights."""
    problems = []
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        problems.append(f"onnx.checker: {str(e).splitlines()[0]}")
    for value in [*model.graph.input, *model.graph.output]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            problems.append(f"graph IO {value.name} is float16 (expected float32 IO)")
    kept = kept_fp32
    users: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, set()).add(node.name)
    stray = [init.name for init in model.graph.initializer
             if init.data_type == TensorProto.FLOAT and not users.get(init.name, set()) <= kept]
    if stray:
        problems.append(f"{len(stray)} float32 initializers outside the float32 target head (e.g. {stray[0]})")
    if not any(init.data_type == TensorProto.FLOAT16 for init in model.graph.initializer):
        problems.append("no float16 initializers")
    return problems


def initializer_types(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for init in model.graph.initializer:
        name = TensorProto.DataType.Name(init.data_type).lower()
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def to_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """Dynamic quantization of MatMul with constant weights only (int8 weights, uint8 activations per tensor).
    Quantizing the audio conv front end as well (ConvInteger) ran ~2x slower than fp32 on CPU."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs "consider pre-processing" on the root logger
    with tempfile.TemporaryDirectory(prefix="d2v-export-") as tmp:
        out = Path(tmp) / "int8.onnx"
        try:
            quantize_dynamic(onnx.ModelProto.FromString(model.SerializeToString()), out,
                             op_types_to_quantize=["MatMul"], per_channel=False, reduce_range=False,
                             weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})
        finally:
            root.setLevel(level)
        return onnx.load(out)


def optimize(model: onnx.ModelProto, cfg: EncoderConfig) -> tuple[onnx.ModelProto | None, dict[str, Any]]:
    """onnxruntime's transformer optimizer (bert fusions: LayerNorm, Gelu, SkipLayerNorm, Attention where the
    pattern matches). Offline fusions only (opt_level 0), so the file runs on any execution provider.
    Returns (None, note) where it does not apply."""
    if cfg.modality not in OPTIMIZABLE:
        return None, {"applied": False, "note": f"skipped: the transformer optimizer has no model type for the "
                                                 f"{cfg.modality} front end"}
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(onnx.ModelProto.FromString(model.SerializeToString()), model_type="bert",
                               num_heads=cfg.num_heads, hidden_size=cfg.hidden_size, opt_level=0, use_gpu=False)
    fused = {op: n for op, n in sorted(optimized.get_fused_operator_statistics().items()) if n}
    if not fused:
        return None, {"applied": False, "note": "skipped: no bert fusion matched this graph"}
    domains = {op.domain for op in optimized.model.opset_import}
    for domain in sorted({n.domain for n in optimized.model.graph.node} - domains - {""}):
        optimized.model.opset_import.append(onnx.helper.make_opsetid(domain, 1))  # e.g. com.microsoft fusions
    return optimized.model, {"applied": True, "model_type": "bert", "fused": fused}
