"""Encoder -> ONNX graph: one wrapper per modality with the contract's named inputs and outputs, exported with
torch's dynamo exporter (eager attention: SDPA with relative position bias does not export), then cleaned so the
file is reproducible (no stack traces, file paths or exporter-internal metadata) and its axes have plain names."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import onnx
import torch
from torch import Tensor, nn
from torch.export import Dim

from d2v.training.models import EncoderConfig, EncoderOutput
from d2v.training.targets import target_representation
from d2v_serve.models.model_file import GRAPH_OUTPUTS
from d2v_serve.preprocess import conv_stride, min_audio_samples

OPSET = 18  # the dynamo exporter's lowest; ORT >= 1.14 runs it
LENGTH_AXIS = {"audio": ("samples", "frames"), "text": ("tokens", "tokens")}


class ExportError(Exception):
    """Export cannot produce a verified model file; the message is one line (figures included)."""


class _Exportable(nn.Module):
    """Encoder + the data2vec target space, returning the three graph outputs."""

    def __init__(self, encoder: nn.Module, cfg: EncoderConfig) -> None:
        super().__init__()
        self.encoder = encoder
        self.cfg = cfg
        for module in encoder.modules():
            if hasattr(module, "use_sdpa"):
                module.use_sdpa = False

    def outputs(self, out: EncoderOutput) -> tuple[Tensor, Tensor, Tensor]:
        return out.last_hidden_state, target_representation(out, self.cfg), out.valid_mask.to(torch.int64)


class AudioGraph(_Exportable):
    def forward(self, input_values: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.outputs(self.encoder(input_values, attention_mask))


class ImageGraph(_Exportable):
    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.outputs(self.encoder(pixel_values))


class TextGraph(_Exportable):
    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.outputs(self.encoder(input_ids, attention_mask))


GRAPHS: dict[str, type[_Exportable]] = {"audio": AudioGraph, "image": ImageGraph, "text": TextGraph}


def graph_module(encoder: nn.Module, cfg: EncoderConfig) -> _Exportable:
    """The module whose forward is the exported graph (also the torch reference for verification)."""
    return GRAPHS[cfg.modality](encoder, cfg).eval()


def max_tokens(cfg: EncoderConfig) -> int:
    """Most tokens (specials included) the position table holds: RoBERTa positions start after pad_id."""
    return cfg.max_positions - cfg.pad_id - 1


def _example(cfg: EncoderConfig) -> tuple[dict[str, Tensor], dict[str, dict[int, Dim]]]:
    batch = Dim("batch", min=1)
    if cfg.modality == "image":
        size = cfg.image_size
        return {"pixel_values": torch.zeros(2, cfg.num_channels, size, size)}, {"pixel_values": {0: batch}}
    if cfg.modality == "audio":
        n = min_audio_samples(cfg.conv_layers) + 7 * conv_stride(cfg.conv_layers)
        values = torch.randn(2, n, generator=torch.Generator().manual_seed(0))
        length = Dim("samples", min=min_audio_samples(cfg.conv_layers))
        inputs = {"input_values": values, "attention_mask": torch.ones(2, n, dtype=torch.int64)}
    else:
        n = min(12, max_tokens(cfg))
        ids = torch.full((2, n), cfg.pad_id + 2, dtype=torch.int64)
        length = Dim("tokens", min=1, max=max_tokens(cfg))
        inputs = {"input_ids": ids, "attention_mask": torch.ones(2, n, dtype=torch.int64)}
    return inputs, {name: {0: batch, 1: length} for name in inputs}


def export_graph(module: _Exportable, cfg: EncoderConfig, opset: int = OPSET) -> onnx.ModelProto:
    """Run torch's exporter on `module`; returns the cleaned fp32 ModelProto. Exporter chatter is kept off stdout."""
    inputs, dynamic_shapes = _example(cfg)
    chatter = io.StringIO()
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not installed"
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    # the audio conv front end is traced channels last (MatMuls, no transposes); the torch reference stays Conv1d
    front_ends = [m for m in module.modules() if hasattr(m, "channels_last_front_end")]
    for m in front_ends:
        m.channels_last_front_end = True
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, (), kwargs=inputs, input_names=list(inputs), output_names=list(GRAPH_OUTPUTS),
                opset_version=opset, dynamic_shapes=dynamic_shapes, dynamo=True, external_data=False, optimize=True,
                verbose=False,
            )
    except Exception as e:  # noqa: BLE001 - torch.export raises many types; the user needs one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {first}") from e
    finally:
        registry_log.setLevel(level)
        for m in front_ends:
            m.channels_last_front_end = False
    model = program.model_proto
    clean(model, cfg.modality)
    return model


def clean(model: onnx.ModelProto, modality: str) -> None:
    """Drop what makes a file depend on where and when it was exported, and name the dynamic axes plainly."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.metadata_props[:]
    model.doc_string = ""
    model.graph.doc_string = ""
    model.graph.name = f"d2v_{modality}"
    for value in model.graph.output:
        dims = value.type.tensor_type.shape.dim
        dims[0].dim_param = "batch"
        if modality in LENGTH_AXIS:
            dims[1].dim_param = LENGTH_AXIS[modality][1]


def target_only_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that only `target_hidden_state` needs (per-layer norms, top-K average): the part of the
    graph that stays float32 in the fp16 variant, because sums over time overflow float16."""
    nodes = model.graph.node
    producer = {out: i for i, node in enumerate(nodes) for out in node.output}

    def ancestors(names: list[str]) -> set[int]:
        seen: set[int] = set()
        stack = list(names)
        while stack:
            i = producer.get(stack.pop())
            if i is None or i in seen:
                continue
            seen.add(i)
            stack.extend(nodes[i].input)
        return seen

    only = ancestors(["target_hidden_state"]) - ancestors(["last_hidden_state", "output_mask"])
    return [nodes[i].name for i in sorted(only)]
