"""The model-file contract: what a d2v ONNX file says about itself, as one typed, torch-free dataclass.

`d2v-export` builds a `ModelFileMeta` and writes `to_dict()` as JSON under key "d2v" of the ONNX `metadata_props`
(field 14); the server reads it back with `read_metadata`, which validates it once and raises `ModelFileError` (one
line, naming the file) for anything it cannot serve. The file is scanned at the protobuf wire level, seeking past the
graph, so reading it costs a few reads even for a multi-GB model.

Format versions: 2 records everything the server needs (conv stride and receptive field, patch size, the output kinds
and the poolings each carries); files of version 1 (exporters before it) still load: their conv figures are computed
from the conv layers, every output is poolable except the audio target space (normalised over time per utterance),
and the registry reads an image model's patch size from its graph's fixed number of positions.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

from ..preprocess import MODALITIES, conv_stride, min_audio_samples

METADATA_KEY = "d2v"
FORMAT = "d2v-onnx"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
PRECISIONS = ("fp32", "fp16", "int8")
GRAPH_INPUTS = {
    "audio": ("input_values", "attention_mask"),
    "image": ("pixel_values",),
    "text": ("input_ids", "attention_mask"),
}
GRAPH_OUTPUTS = ("last_hidden_state", "target_hidden_state", "output_mask")
OUTPUT_MASK = "output_mask"
REPRESENTATIONS = {"last": "last_hidden_state", "target": "target_hidden_state"}  # output kind -> graph output
POOLINGS = ("mean", "cls", "none")
_METADATA_PROPS = 14  # ModelProto.metadata_props: repeated StringStringEntryProto {key = 1; value = 2}
_REQUIRED = ("modality", "hidden_size", "inputs", "outputs", "precision", "preprocessing")
_REQUIRED_V2 = {"audio": ("conv_layers", "conv_stride", "receptive_field"), "image": ("image_size", "patch_size"),
                "text": ("max_positions",)}


class ModelFileError(ValueError):
    """A file that is not a usable d2v ONNX model; the message is one line and names the file."""


@dataclass(frozen=True)
class OutputKind:
    """One representation a file offers: its graph output and the poolings that carry information on it."""

    output: str
    poolings: tuple[str, ...] = POOLINGS


@dataclass(frozen=True)
class ModelFileMeta:
    """Everything the server needs from a model file. Audio, image and text fields are 0 / empty elsewhere."""

    modality: str
    hidden_size: int
    num_layers: int
    num_heads: int
    precision: str  # fp32 | fp16 | int8
    preprocessing: dict[str, Any]  # the preprocessing module's dict (text: the tokenizer JSON included)
    representations: dict[str, OutputKind]  # "last", "target" -> graph output and its poolings
    inputs: tuple[str, ...] = ()  # graph input names
    outputs: tuple[str, ...] = GRAPH_OUTPUTS  # graph output names
    conv_layers: tuple[tuple[int, int, int], ...] = ()  # audio: (dim, kernel, stride) per conv layer
    conv_stride: int = 0  # audio: samples per output frame
    receptive_field: int = 0  # audio: fewest samples that give one frame
    training_crop_seconds: float | None = None  # audio: the crop it was trained on (the default chunking window)
    image_size: int = 0  # image: pixels per side the graph takes
    patch_size: int = 0  # image: pixels per patch side (0 in version-1 files: the registry reads it from the graph)
    max_positions: int = 0  # text: most tokens, specials included
    target_layers: int = 0
    source: dict[str, Any] = field(default_factory=dict)  # checkpoint name and digest, import origin
    exporter: dict[str, Any] = field(default_factory=dict)  # versions
    parity: dict[str, Any] = field(default_factory=dict)  # the export's parity report
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not self.inputs:
            object.__setattr__(self, "inputs", GRAPH_INPUTS.get(self.modality, ()))

    def replace(self, **changes: Any) -> ModelFileMeta:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written into the file (key order fixed, so exports are reproducible)."""
        d: dict[str, Any] = {
            "format": FORMAT, "format_version": self.format_version, "modality": self.modality,
            "hidden_size": self.hidden_size, "num_layers": self.num_layers, "num_heads": self.num_heads,
            "inputs": list(self.inputs), "outputs": list(self.outputs), "precision": self.precision,
            "preprocessing": self.preprocessing,
        }
        if self.modality == "audio":
            d.update(conv_layers=[list(c) for c in self.conv_layers], conv_stride=self.conv_stride,
                     receptive_field=self.receptive_field)
            if self.training_crop_seconds is not None:
                d["training_crop_seconds"] = self.training_crop_seconds
        elif self.modality == "image":
            d.update(image_size=self.image_size, patch_size=self.patch_size)
        else:
            d["max_positions"] = self.max_positions
        d["representations"] = {k: {"output": v.output, "poolings": list(v.poolings)}
                                for k, v in self.representations.items()}
        d.update(target_layers=self.target_layers, source=self.source, exporter=self.exporter, parity=self.parity)
        return d

    def public_json(self) -> str:
        """The metadata as clients see it: without the tokenizer text (megabytes, and of no use to a client)."""
        d = json.loads(json.dumps(self.to_dict()))
        d["preprocessing"].pop("tokenizer", None)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_dict(cls, meta: Any, where: str = "metadata") -> ModelFileMeta:
        """Validate a file's JSON metadata (version 1 or 2); raises ModelFileError naming `where`."""
        try:
            return _from_dict(meta, where)
        except ModelFileError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise ModelFileError(f"{where}: malformed d2v metadata ({type(exc).__name__}: {exc})") from None


def audio_conv(conv_layers: Any, where: str) -> tuple[tuple[int, int, int], ...]:
    layers = tuple(tuple(int(x) for x in layer) for layer in conv_layers)
    if not layers or any(len(layer) != 3 or min(layer) < 1 for layer in layers):
        raise ModelFileError(f"{where}: conv_layers must be [dim, kernel, stride] triples of positive integers")
    return layers  # type: ignore[return-value]


def _from_dict(meta: Any, where: str) -> ModelFileMeta:
    if not isinstance(meta, dict):
        raise ModelFileError(f"{where}: d2v metadata must be a JSON object")
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{where}: metadata format is {meta.get('format')!r}, expected {FORMAT!r}")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ModelFileError(f"{where}: metadata format_version {version!r} is not supported (this server reads "
                             f"{', '.join(map(str, READABLE_VERSIONS))}); upgrade d2v or re-export the model")
    missing = [k for k in _REQUIRED if k not in meta]
    modality = meta.get("modality")
    if version >= 2 and modality in _REQUIRED_V2:
        missing += [k for k in (*_REQUIRED_V2[modality], "representations") if k not in meta]
    if missing:
        raise ModelFileError(f"{where}: metadata lacks {', '.join(missing)}")
    if modality not in MODALITIES:
        raise ModelFileError(f"{where}: unknown modality {modality!r} (expected one of {', '.join(MODALITIES)})")
    if tuple(meta["inputs"]) != GRAPH_INPUTS[modality]:
        raise ModelFileError(f"{where}: {modality} graph inputs are {meta['inputs']}, expected "
                             f"{list(GRAPH_INPUTS[modality])}")
    lacking = [o for o in GRAPH_OUTPUTS if o not in meta["outputs"]]
    if lacking:
        raise ModelFileError(f"{where}: graph outputs lack {', '.join(lacking)}")
    if modality == "audio" and not meta.get("conv_layers"):
        raise ModelFileError(f"{where}: audio metadata lacks conv_layers")
    if not isinstance(meta["preprocessing"], dict):
        raise ModelFileError(f"{where}: preprocessing must be a JSON object")
    if meta["precision"] not in PRECISIONS:
        raise ModelFileError(f"{where}: precision {meta['precision']!r} is not one of {', '.join(PRECISIONS)}")
    fields: dict[str, Any] = {}
    if modality == "audio":
        layers = audio_conv(meta["conv_layers"], where)
        stride, field_ = conv_stride(layers), min_audio_samples(layers)
        if version >= 2 and (meta["conv_stride"], meta["receptive_field"]) != (stride, field_):
            raise ModelFileError(f"{where}: conv_stride {meta['conv_stride']} / receptive_field "
                                 f"{meta['receptive_field']} do not match conv_layers ({stride} / {field_})")
        crop = meta.get("training_crop_seconds")
        fields.update(conv_layers=layers, conv_stride=stride, receptive_field=field_,
                      training_crop_seconds=None if crop is None else float(crop))
    elif modality == "image":
        fields.update(image_size=int(meta.get("image_size") or 0), patch_size=int(meta.get("patch_size") or 0))
        if version >= 2 and (fields["patch_size"] < 1 or fields["image_size"] % fields["patch_size"]):
            raise ModelFileError(f"{where}: image_size {fields['image_size']} is not a multiple of patch_size "
                                 f"{fields['patch_size']}")
    else:
        fields["max_positions"] = int(meta.get("max_positions") or 0)
    return ModelFileMeta(
        modality=modality, hidden_size=int(meta["hidden_size"]), num_layers=int(meta.get("num_layers") or 0),
        num_heads=int(meta.get("num_heads") or 0), precision=meta["precision"], preprocessing=meta["preprocessing"],
        representations=_representations(meta, modality, version, where), inputs=tuple(meta["inputs"]),
        outputs=tuple(meta["outputs"]), target_layers=int(meta.get("target_layers") or 0),
        source=dict(meta.get("source") or {}), exporter=dict(meta.get("exporter") or {}),
        parity=dict(meta.get("parity") or {}), format_version=version, **fields)


def _representations(meta: dict[str, Any], modality: str, version: int, where: str) -> dict[str, OutputKind]:
    if version == 1:  # every output poolable, except the audio target space: instance-normalised over time
        target = ("none",) if modality == "audio" else POOLINGS
        return {"last": OutputKind(REPRESENTATIONS["last"]), "target": OutputKind(REPRESENTATIONS["target"], target)}
    kinds = {}
    for name, kind in meta["representations"].items():
        output, poolings = kind["output"], tuple(kind["poolings"])
        if REPRESENTATIONS.get(name) != output or not poolings or not set(poolings) <= set(POOLINGS):
            raise ModelFileError(f"{where}: representation {name!r} must name its graph output "
                                 f"{REPRESENTATIONS.get(name)!r} and poolings among {', '.join(POOLINGS)}")
        kinds[name] = OutputKind(output, poolings)
    return kinds


def patch_size_from_positions(image_size: int, positions: int) -> int:
    """A version-1 image file's patch size from its graph's fixed output positions (patches + CLS); 0 if none fits."""
    side = round((positions - 1) ** 0.5)
    if side < 1 or side * side != positions - 1 or image_size % side:
        return 0
    return image_size // side


def _varint(f: BinaryIO) -> int | None:
    """The next base-128 varint, or None at a clean end of file."""
    result = shift = 0
    while True:
        b = f.read(1)
        if not b:
            if shift == 0:
                return None
            raise EOFError("truncated varint")
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _skip(f: BinaryIO, wire_type: int) -> None:
    if wire_type == 0:
        _varint(f)
    elif wire_type == 1:
        f.seek(8, 1)
    elif wire_type == 2:
        f.seek(_length(f), 1)
    elif wire_type == 5:
        f.seek(4, 1)
    else:
        raise ValueError(f"unsupported protobuf wire type {wire_type}")


def _length(f: BinaryIO) -> int:
    n = _varint(f)
    if n is None:
        raise EOFError("truncated length")
    return n


def _entry(data: bytes) -> tuple[str, str]:
    """Decode one StringStringEntryProto."""
    f = io.BytesIO(data)
    fields = {1: "", 2: ""}
    while (tag := _varint(f)) is not None:
        number, wire_type = tag >> 3, tag & 7
        if number in fields and wire_type == 2:
            fields[number] = f.read(_length(f)).decode("utf-8")
        else:
            _skip(f, wire_type)
    return fields[1], fields[2]


def read_metadata_props(path: str | Path) -> dict[str, str]:
    """All `metadata_props` of an ONNX file as a dict."""
    props: dict[str, str] = {}
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        while (tag := _varint(f)) is not None:
            number, wire_type = tag >> 3, tag & 7
            if number == _METADATA_PROPS and wire_type == 2:
                key, value = _entry(f.read(_length(f)))
                props[key] = value
            else:
                _skip(f, wire_type)
            if f.tell() > size:
                raise EOFError("field runs past the end of the file")
    return props


def read_metadata(path: str | Path) -> ModelFileMeta:
    """The validated contract of a model file. Raises ModelFileError (one line) when it is not one."""
    path = Path(path)
    try:
        props = read_metadata_props(path)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    except (OSError, EOFError, ValueError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path}: not a readable ONNX file ({exc})") from None
    if METADATA_KEY not in props:
        raise ModelFileError(f"{path}: no '{METADATA_KEY}' metadata (not exported by d2v-export)")
    try:
        meta = json.loads(props[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: '{METADATA_KEY}' metadata is not JSON ({exc.msg})") from None
    return ModelFileMeta.from_dict(meta, str(path))
