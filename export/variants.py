"""Graph variants: ONNX Runtime fusions of the exported graph, fp16 (GPU), int8 dynamic quantization (CPU)."""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
from onnx import TensorProto

from .fp16 import to_fp16  # noqa: F401 - re-exported: every variant lives here

MS_DOMAIN = "com.microsoft"
FUSED_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "BiasGelu", "FastGelu", "Gelu",
             "FusedMatMul", "QAttention")


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
    """Dynamic quantization (int8 weights, uint8 activations per tensor) of every MatMul with a constant weight and
    of each fused Attention: one whose additive bias is only the padding mask takes that mask as its key mask and
    becomes onnxruntime's QAttention (int8 QKV GEMM written straight into per-head layout, then the attention core);
    one with more in its bias (the image's relative position bias), which QAttention has no input for, is unpacked
    into its QKV MatMul (quantized) + Split + MultiHeadAttention. The audio conv front end is exported as MatMuls
    (see AudioEncoder.conv_features), so it is quantized as well."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = unpack_attention(attention_with_key_mask(model))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs "consider pre-processing" on the root logger
    with tempfile.TemporaryDirectory(prefix="d2v-export-") as tmp:
        out = Path(tmp) / "int8.onnx"
        try:
            quantize_dynamic(model, out, op_types_to_quantize=["MatMul", "Attention"], per_channel=False,
                             reduce_range=False, weight_type=QuantType.QInt8,
                             extra_options={"MatMulConstBOnly": True})
        finally:
            root.setLevel(level)
        return onnx.load(out)


def attention_with_key_mask(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where each fused Attention whose additive attention bias is only a padding mask, i.e.
    Expand(Unsqueeze(Where(keep, 0, lowest) -> [B, 1, 1, T])), takes the [B, T] keep mask as its `mask_index` (int32,
    1 = attend) instead, and loses the `qkv_hidden_sizes` attribute where the three parts are equal (the form
    onnxruntime's quantizer turns into QAttention). Attention nodes with any other bias are left as they are."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    constants = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}
    masks: dict[str, str] = {}  # keep-mask tensor -> its int32 cast
    casts = []
    for node in graph.node:
        if node.op_type != "Attention" or node.domain != MS_DOMAIN or len(node.input) < 6:
            continue
        if any(node.input[3:5]) or any(node.input[6:]):
            continue
        keep = _padding_keep_mask(node.input[5], producer, constants)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if keep is None or len(set(attrs.get("qkv_hidden_sizes", [0]))) != 1:
            continue
        if keep not in masks:
            masks[keep] = f"{keep}_mask_index"
            casts.append(onnx.helper.make_node("Cast", [keep], [masks[keep]], name=f"{keep}_to_mask_index",
                                               to=TensorProto.INT32))
        node.input[3] = masks[keep]
        del node.input[4:]
        kept = [a for a in node.attribute if a.name != "qkv_hidden_sizes"]
        del node.attribute[:]
        node.attribute.extend(kept)
    if casts:
        first = min(i for i, node in enumerate(graph.node) if node.op_type == "Attention")
        for cast in reversed(casts):
            graph.node.insert(first, cast)
        _drop_unused_nodes(graph)
    return model


def _padding_keep_mask(bias: str, producer: dict[str, onnx.NodeProto], constants: dict[str, np.ndarray]
                       ) -> str | None:
    """The [B, T] boolean keep mask an attention bias is built from, when the bias is nothing else:
    Expand(Unsqueeze(Where(cond, a, b), axes [1, 2]), shape) with one of a, b zero and the other <= -1e4."""
    expand = producer.get(bias)
    unsqueeze = producer.get(expand.input[0]) if expand is not None and expand.op_type == "Expand" else None
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or len(unsqueeze.input) < 2:
        return None
    axes = constants.get(unsqueeze.input[1])
    where = producer.get(unsqueeze.input[0])
    if axes is None or sorted(axes.reshape(-1).tolist()) != [1, 2] or where is None or where.op_type != "Where":
        return None
    cond, a, b = where.input
    values = [_scalar(name, producer, constants) for name in (a, b)]
    if None in values:
        return None
    if_true, if_false = values
    if if_true == 0.0 and if_false <= -1e4:  # Where(keep, 0, lowest)
        return cond
    negation = producer.get(cond)
    if if_true <= -1e4 and if_false == 0.0 and negation is not None and negation.op_type == "Not":
        return negation.input[0]  # Where(Not(keep), lowest, 0): what torch's masked_fill exports
    return None


def _scalar(name: str, producer: dict[str, onnx.NodeProto], constants: dict[str, np.ndarray]) -> float | None:
    """The value of a tensor that is one number everywhere: a one-element initializer, or one Expanded."""
    node = producer.get(name)
    if node is not None and node.op_type == "Expand":
        name = node.input[0]
    value = constants.get(name)
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _drop_unused_nodes(graph: onnx.GraphProto) -> None:
    """Remove nodes none of whose outputs is used (repeatedly), and initializers no node uses."""
    outputs = {v.name for v in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        dead = [node for node in graph.node if not any(out in used for out in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def unpack_attention(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where each fused Attention (but those in QAttention's form: a key mask, no attention bias) is its
    packed QKV MatMul, a Split and a MultiHeadAttention taking the QKV bias and the attention bias. onnxruntime's
    QAttention (what its quantizer makes of an Attention) has no input
    for an additive attention bias, so the padding mask and relative position bias would be lost; a MatMul
    quantizes like every other projection."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    nodes = []
    for node in model.graph.node:
        if node.op_type != "Attention" or node.domain != MS_DOMAIN or _has_key_mask_only(node):
            nodes.append(node)
            continue
        x, weight, bias = node.input[:3]
        extra = list(node.input[3:])
        attention_bias = extra[2] if len(extra) > 2 else ""
        if any(extra[i] for i in (0, 1, 3) if i < len(extra)):
            raise ValueError(f"{node.name}: Attention with a mask index or past state cannot be unpacked")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        equal_parts = len(set(attrs.pop("qkv_hidden_sizes", [0]))) == 1
        if not equal_parts or set(attrs) - {"num_heads", "scale", "mask_filter_value"}:
            raise ValueError(f"{node.name}: unexpected Attention attributes {sorted(set(attrs))}")
        qkv = [f"{node.name}_{part}" for part in ("q", "k", "v")]
        nodes += [
            onnx.helper.make_node("MatMul", [x, weight], [f"{node.name}_qkv"], name=f"{node.name}_qkv_matmul"),
            onnx.helper.make_node("Split", [f"{node.name}_qkv"], qkv, name=f"{node.name}_split", axis=-1,
                                  num_outputs=3),
            onnx.helper.make_node("MultiHeadAttention", [*qkv, bias, "", attention_bias], list(node.output),
                                  name=f"{node.name}_mha", domain=MS_DOMAIN, **attrs),
        ]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _has_key_mask_only(node: onnx.NodeProto) -> bool:
    """An Attention that takes a key mask and no attention bias or past state: QAttention's form."""
    return len(node.input) == 4 and bool(node.input[3])


def fuse(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxscript's ONNX Runtime fusions, the rewriter written for torch's dynamo exports: math attention ->
    com.microsoft Attention (one packed QKV GEMM; MultiHeadAttention where the packing does not match), erf GELU
    after a bias -> BiasGelu, residual add + LayerNorm -> SkipLayerNormalization. Each of these contrib ops has CPU
    and CUDA kernels; the padding mask and the image's relative position bias reach attention as its additive bias."""
    import onnx_ir as ir
    import onnxscript.optimizer
    from onnxscript.rewriter.ort_fusions import optimize_for_ort
    from onnxscript.rewriter.ort_fusions.attention import fuse_attention
    from onnxscript.rewriter.ort_fusions.mha_bias import fuse_mha_bias

    fused, counts = optimize_for_ort(ir.from_proto(model))
    if counts.get("mha1", 0) + counts.get("mha2", 0) and not counts.get("attention", 0):
        _shape_from_projection_input(fused)
        if fuse_mha_bias(fused):
            fuse_attention(fused)
        onnxscript.optimizer.optimize(fused)
    proto = ir.to_proto(fused)
    _fold_weight_constants(proto)
    return proto


def _fold_weight_constants(model: onnx.ModelProto) -> None:
    """Store what onnxscript's folding leaves alone above its size limit as one initializer each, so the quantizer
    sees constant MatMul weights: each packed QKV weight (a Concat of the three projections' initializers) and each
    audio conv weight in MatMul form (a Reshape of the permuted kernel)."""
    inits = {init.name: init for init in model.graph.initializer}
    uses = Counter(name for node in model.graph.node for name in node.input)
    for node in list(model.graph.node):
        if node.op_type not in ("Concat", "Reshape") or node.domain or not all(n in inits for n in node.input):
            continue
        arrays = [onnx.numpy_helper.to_array(inits[name]) for name in node.input]
        if node.op_type == "Concat":
            axis = next(a.i for a in node.attribute if a.name == "axis")
            folded = np.concatenate(arrays, axis)
        else:
            literal_zeros = any(a.name == "allowzero" and a.i for a in node.attribute)
            if 0 in arrays[1] and not literal_zeros:
                continue  # this 0 copies an input dimension: leave it to the runtime
            folded = arrays[0].reshape(arrays[1])
        model.graph.initializer.append(onnx.numpy_helper.from_array(folded, node.output[0]))
        inits[node.output[0]] = model.graph.initializer[-1]
        model.graph.node.remove(node)
        for name in node.input:
            uses[name] -= 1
            if uses[name] == 0 and name in inits:
                model.graph.initializer.remove(inits.pop(name))


def _shape_from_projection_input(model: Any) -> None:
    """The padding mask's expansion to [B, 1, T, T] reads T from the projected query; read it from the projection's
    input instead (same batch and length), so the query projection's bias can fold into the attention op."""
    for node in model.graph:
        if node.op_type != "MultiHeadAttention":
            continue
        query = node.inputs[0]
        add = query.producer() if query is not None else None
        matmul = add.inputs[0].producer() if add is not None and add.op_type == "Add" else None
        if matmul is None or matmul.op_type != "MatMul":
            continue
        for user, index in list(query.uses()):
            if user.op_type == "Shape" and user.attributes.get_int("end", len(query.shape or ())) <= 2:
                user.replace_input_with(index, matmul.inputs[0])


def fused_nodes(model: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each fused type a graph holds (zeros included, so a missing fusion shows), then any other
    com.microsoft op in it."""
    counts = Counter(node.op_type for node in model.graph.node if node.domain == MS_DOMAIN)
    return {op: counts[op] for op in FUSED_OPS} | {op: n for op, n in sorted(counts.items()) if op not in FUSED_OPS}


def session_fused_nodes(model: onnx.ModelProto) -> dict[str, int] | str:
    """The fused nodes an ONNX Runtime CPU session runs after its own graph optimizations (the server's level),
    read from the session's saved optimized model; a one-line reason instead where the session does not load."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="d2v-export-") as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "weights.bin")
        opts.log_severity_level = 3  # "may contain hardware specific optimizations": we only count nodes
        try:
            ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types per failure
            return f"not counted: the CPU session does not load ({str(e).strip().splitlines()[0][:160]})"
        return fused_nodes(onnx.load(Path(tmp) / "optimized.onnx", load_external_data=False))
