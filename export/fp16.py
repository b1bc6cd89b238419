"""float32 -> float16 for d2v graphs, float32 inputs and outputs kept.

The activation path (everything that depends on the input signal or on a weight) runs in float16. Two parts stay
float32: the mask and length arithmetic (frame counts divide sample counts in floating point: float16 holds
integers exactly only up to 2048) and the target head (per-layer norms over time and the top-K average: its sums
over time overflow float16). Casts sit on the edges between the two regions, one per value.

Written here rather than taken from onnxconverter-common / onnxruntime.transformers.float16: with a float32 region
inside the graph both produced invalid models (unsorted nodes, duplicate Cast names, float16 graph outputs).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph import target_only_nodes

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)
RANGE = ("fp16_lowest", "fp16_max")  # float32 scalars: values cross into float16 clipped to its finite range


class Fp16Error(Exception):
    pass


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    if any(node.domain not in ("", "ai.onnx") for node in model.graph.node):  # fused contrib ops
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=True)
    else:
        inferred = onnx.shape_inference.infer_shapes(model)
    types = {}
    for value in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]:
        types[value.name] = value.type.tensor_type.elem_type
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    return types


def float32_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes that stay float32: those that depend on neither the input signal nor a weight (mask and
    length arithmetic), and the target head."""
    graph = model.graph
    weights = {i.name for i in graph.initializer if i.data_type == FLOAT and int(np.prod(i.dims)) > 1}
    signal = {v.name for v in graph.input if v.name in ("input_values", "pixel_values", "input_ids")}
    active = weights | signal
    activation_nodes = set()
    for node in graph.node:  # topological order
        if any(name in active for name in node.input):
            activation_nodes.add(node.name)
            active.update(node.output)
    return {n.name for n in graph.node if n.name not in activation_nodes} | set(target_only_nodes(model))


def convert(model: onnx.ModelProto) -> tuple[onnx.ModelProto, set[str]]:
    """The float16 model and the names of its float32 nodes (the inserted Clips included)."""
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        raise Fp16Error("graphs with subgraphs (If/Loop) are not supported")
    if len({n.name for n in graph.node}) != len(graph.node) or any(not n.name for n in graph.node):
        raise Fp16Error("node names must be unique and non-empty")
    types = _value_types(model)
    keep32 = float32_nodes(model)
    inits = {i.name: i for i in graph.initializer}
    graph_outputs = {v.name for v in graph.output}

    def is_float(name: str) -> bool:
        if name not in types:
            raise Fp16Error(f"no type known for value {name!r}")
        return types[name] == FLOAT

    producer_is_half: dict[str, bool] = {}  # values -> produced in the float16 region
    renamed: set[str] = set()  # float graph outputs produced in float16: the node writes name__fp16, a Cast the name
    for node in graph.node:
        for out in node.output:
            producer_is_half[out] = node.name not in keep32
            if producer_is_half[out] and out in graph_outputs and is_float(out):
                renamed.add(out)

    new_inits: list[onnx.TensorProto] = []
    half_inits: dict[str, str] = {}
    casts: dict[tuple[str, int], str] = {}
    nodes: list[onnx.NodeProto] = []

    def as_type(name: str, want_half: bool) -> str:
        """The name of `name` in the wanted precision, adding a Cast (once per value) or a float16 initializer."""
        if not name or not is_float(name):
            return name
        if name in renamed:
            return f"{name}__fp16" if want_half else name
        if name in inits:
            if not want_half:
                return name
            if name not in half_inits:
                arr = np.clip(numpy_helper.to_array(inits[name]), -FP16_MAX, FP16_MAX).astype(np.float16)
                half_inits[name] = f"{name}__fp16"
                new_inits.append(numpy_helper.from_array(arr, half_inits[name]))
            return half_inits[name]
        is_half = producer_is_half.get(name, False)  # graph inputs are float32
        if is_half == want_half:
            return name
        key = (name, HALF if want_half else FLOAT)
        if key not in casts:
            casts[key] = f"{name}__{'fp16' if want_half else 'fp32'}"
            source = name
            if want_half:  # e.g. the additive key-padding mask holds float32's lowest value: keep it finite
                if not new_inits or new_inits[0].name != RANGE[0]:
                    new_inits[:0] = [numpy_helper.from_array(np.array(v, np.float32), n)
                                     for n, v in zip(RANGE, (-FP16_MAX, FP16_MAX), strict=True)]
                source = f"{name}__clipped"
                nodes.append(helper.make_node("Clip", [name, *RANGE], [source], name=f"clip/{name}"))
                keep32.add(f"clip/{name}")
            nodes.append(helper.make_node("Cast", [source], [casts[key]], name=f"cast/{casts[key]}", to=key[1]))
        return casts[key]

    for node in graph.node:
        half = node.name not in keep32
        new = onnx.NodeProto()
        new.CopyFrom(node)
        for i, name in enumerate(node.input):
            new.input[i] = as_type(name, half)
        if half:
            for attr in new.attribute:
                if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
                    attr.i = HALF
                elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == FLOAT:
                    arr = np.clip(numpy_helper.to_array(attr.t), -FP16_MAX, FP16_MAX).astype(np.float16)
                    attr.t.CopyFrom(numpy_helper.from_array(arr, attr.t.name))
        for i, out in enumerate(node.output):
            if out in renamed:
                new.output[i] = f"{out}__fp16"
        nodes.append(new)
        for out in node.output:
            if out in renamed:
                nodes.append(helper.make_node("Cast", [f"{out}__fp16"], [out], name=f"cast/{out}", to=FLOAT))

    used = {name for n in nodes for name in n.input}
    kept_inits = [i for i in graph.initializer if i.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept_inits + new_inits)
    del graph.value_info[:]
    return model, keep32


def to_fp16(model: onnx.ModelProto) -> tuple[onnx.ModelProto, set[str]]:
    """A float16 copy of `model` (the input is not changed) and its float32 node names."""
    return convert(onnx.ModelProto.FromString(model.SerializeToString()))
