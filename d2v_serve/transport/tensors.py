"""numpy <-> the proto Tensor (shape + dtype + packed little-endian bytes), shared by the server and the client."""

from __future__ import annotations

import numpy as np

from .._proto.d2v.v1 import embedder_pb2 as pb

DTYPES = {pb.DTYPE_FLOAT32: np.dtype("<f4"), pb.DTYPE_FLOAT16: np.dtype("<f2")}
_BY_NUMPY = {v: k for k, v in DTYPES.items()}


def to_tensor(array: np.ndarray) -> pb.Tensor:
    """Pack a float32 or float16 array (any byte order) as little-endian C-order bytes."""
    tensor = pb.Tensor()
    fill_tensor(tensor, array)
    return tensor


def fill_tensor(tensor: pb.Tensor, array: np.ndarray) -> None:
    """`to_tensor` into a Tensor field of a message being built (no copy of a finished Tensor into its parent)."""
    dtype = array.dtype.newbyteorder("<")
    if dtype not in _BY_NUMPY:
        raise ValueError(f"cannot send dtype {array.dtype} (float32 or float16)")
    tensor.shape.extend(array.shape)
    tensor.dtype = _BY_NUMPY[dtype]
    tensor.data = np.ascontiguousarray(array, dtype=dtype).tobytes()


def from_tensor(tensor: pb.Tensor) -> np.ndarray:
    """The array a Tensor holds, in native byte order."""
    if tensor.dtype not in DTYPES:
        raise ValueError(f"unknown tensor dtype {tensor.dtype}")
    dtype = DTYPES[tensor.dtype]
    shape = tuple(int(d) for d in tensor.shape)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(tensor.data) != expected:
        raise ValueError(f"tensor of shape {shape} {dtype} needs {expected} bytes, got {len(tensor.data)}")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
