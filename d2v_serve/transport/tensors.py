"""numpy <-> the proto Tensor (shape + dtype + packed little-endian bytes), shared by the server and the client."""

from __future__ import annotations

import numpy as np

from .._proto.d2v.v1 import embedder_pb2 as pb

# The proto's dtypes by the names the core and the HTTP API use, and how numpy holds each (binary is packed bits in
# int8, so its name, not its numpy dtype, says what a tensor holds).
NAMES = {"float32": pb.DTYPE_FLOAT32, "float16": pb.DTYPE_FLOAT16, "int8": pb.DTYPE_INT8, "uint8": pb.DTYPE_UINT8,
         "binary": pb.DTYPE_BINARY, "ubinary": pb.DTYPE_UBINARY}
NUMPY = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "int8": np.dtype("i1"), "uint8": np.dtype("u1"),
         "binary": np.dtype("i1"), "ubinary": np.dtype("u1")}
_BY_ENUM = {enum: name for name, enum in NAMES.items()}


def to_tensor(array: np.ndarray, dtype: str = "") -> pb.Tensor:
    """Pack an array (any byte order) as little-endian C-order bytes; `dtype`: its name (default: float32 or
    float16 from the array)."""
    tensor = pb.Tensor()
    fill_tensor(tensor, array, dtype)
    return tensor


def fill_tensor(tensor: pb.Tensor, array: np.ndarray, dtype: str = "") -> None:
    """`to_tensor` into a Tensor field of a message being built (no copy of a finished Tensor into its parent)."""
    name = dtype or {np.dtype("<f4"): "float32", np.dtype("<f2"): "float16"}.get(array.dtype.newbyteorder("<"), "")
    if name not in NAMES:
        raise ValueError(f"cannot send dtype {dtype or array.dtype} (one of {', '.join(NAMES)})")
    tensor.shape.extend(array.shape)
    tensor.dtype = NAMES[name]
    tensor.data = np.ascontiguousarray(array, dtype=NUMPY[name]).tobytes()


def tensor_dtype(tensor: pb.Tensor) -> str:
    """The name of a Tensor's dtype; ValueError for one this version does not know."""
    if tensor.dtype not in _BY_ENUM:
        raise ValueError(f"unknown tensor dtype {tensor.dtype}")
    return _BY_ENUM[tensor.dtype]


def from_tensor(tensor: pb.Tensor) -> np.ndarray:
    """The array a Tensor holds, in native byte order."""
    dtype = NUMPY[tensor_dtype(tensor)]
    shape = tuple(int(d) for d in tensor.shape)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(tensor.data) != expected:
        raise ValueError(f"tensor of shape {shape} {dtype} needs {expected} bytes, got {len(tensor.data)}")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
