"""Read the d2v metadata of an ONNX model file without onnx and without loading the graph.

The metadata is the JSON value of key "d2v" in `ModelProto.metadata_props` (field 14). The file is scanned at the
protobuf wire level, seeking past the graph, so reading it costs a few reads even for a multi-GB model.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, BinaryIO

METADATA_KEY = "d2v"
FORMAT = "d2v-onnx"
FORMAT_VERSION = 1
MODALITIES = ("audio", "image", "text")
_METADATA_PROPS = 14  # ModelProto.metadata_props: repeated StringStringEntryProto {key = 1; value = 2}
_REQUIRED = ("modality", "hidden_size", "inputs", "outputs", "precision", "preprocessing")
_GRAPH_INPUTS = {
    "audio": ["input_values", "attention_mask"],
    "image": ["pixel_values"],
    "text": ["input_ids", "attention_mask"],
}
OUTPUTS = ("last_hidden_state", "target_hidden_state", "output_mask")


class ModelFileError(ValueError):
    """A file that is not a usable d2v ONNX model; the message is one line and names the file."""


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


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The validated d2v metadata dict of a model file. Raises ModelFileError (one line) when it is not one."""
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
    validate_metadata(meta, str(path))
    return meta


def validate_metadata(meta: Any, where: str = "metadata") -> None:
    """Check the fields the server relies on; raises ModelFileError naming `where`."""
    if not isinstance(meta, dict):
        raise ModelFileError(f"{where}: d2v metadata must be a JSON object")
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{where}: metadata format is {meta.get('format')!r}, expected {FORMAT!r}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(f"{where}: metadata format_version {version!r} is not supported (this server reads "
                             f"{FORMAT_VERSION}); upgrade d2v or re-export the model")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise ModelFileError(f"{where}: metadata lacks {', '.join(missing)}")
    modality = meta["modality"]
    if modality not in MODALITIES:
        raise ModelFileError(f"{where}: unknown modality {modality!r} (expected one of {', '.join(MODALITIES)})")
    if list(meta["inputs"]) != _GRAPH_INPUTS[modality]:
        raise ModelFileError(f"{where}: {modality} graph inputs are {meta['inputs']}, expected "
                             f"{_GRAPH_INPUTS[modality]}")
    lacking = [o for o in OUTPUTS if o not in meta["outputs"]]
    if lacking:
        raise ModelFileError(f"{where}: graph outputs lack {', '.join(lacking)}")
    if modality == "audio" and not meta.get("conv_layers"):
        raise ModelFileError(f"{where}: audio metadata lacks conv_layers")
    if not isinstance(meta["preprocessing"], dict):
        raise ModelFileError(f"{where}: preprocessing must be a JSON object")
