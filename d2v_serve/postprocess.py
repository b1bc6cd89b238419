"""Per-input output: the requested representation at the valid positions -> pooled, normalised, cast."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._proto.d2v.v1 import embedder_pb2 as pb
from .errors import failed_precondition, invalid_argument
from .registry import REPRESENTATIONS, Model
from .tensors import to_tensor

POOLINGS = {pb.POOLING_UNSPECIFIED: "mean", pb.POOLING_MEAN: "mean", pb.POOLING_NONE: "none", pb.POOLING_CLS: "cls"}
_REPRESENTATIONS = {pb.REPRESENTATION_UNSPECIFIED: "last", pb.REPRESENTATION_LAST_LAYER: "last",
                    pb.REPRESENTATION_TARGET: "target"}
_DTYPES = {pb.DTYPE_UNSPECIFIED: np.float32, pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_FLOAT16: np.float16}


@dataclass(frozen=True)
class OutputOptions:
    output: str = REPRESENTATIONS["last"]  # graph output name
    pooling: str = "mean"  # none | mean | cls
    normalize: bool = False
    dtype: type = np.float32

    def __call__(self, hidden: np.ndarray) -> pb.Tensor:
        """[positions, hidden] -> the packed [hidden] (mean, cls) or [positions, hidden] (none)."""
        return to_tensor(self.apply(hidden))

    def apply(self, hidden: np.ndarray) -> np.ndarray:
        h = np.asarray(hidden, dtype=np.float32)
        if self.pooling == "mean":
            h = h.mean(axis=0, dtype=np.float64).astype(np.float32)
        elif self.pooling == "cls":
            h = h[0]
        if self.normalize:
            norm = np.linalg.norm(h, axis=-1, keepdims=True)
            h = h / np.maximum(norm, 1e-12)
        return h.astype(self.dtype)


def output_options(model: Model, options: pb.EmbedOptions) -> OutputOptions:
    """Validate a request's options against the model; raises ServeError."""
    if options.pooling not in POOLINGS:
        raise invalid_argument(f"unknown pooling {options.pooling}")
    if options.representation not in _REPRESENTATIONS:
        raise invalid_argument(f"unknown representation {options.representation}")
    if options.dtype not in _DTYPES:
        raise invalid_argument(f"unknown dtype {options.dtype}")
    representation = _REPRESENTATIONS[options.representation]
    if representation not in model.outputs:
        raise failed_precondition(f"model {model.name} has no {representation} representation")
    return OutputOptions(model.outputs[representation], POOLINGS[options.pooling], options.normalize,
                         _DTYPES[options.dtype])
