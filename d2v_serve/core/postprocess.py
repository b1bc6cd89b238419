"""Per-input output: the requested representation at the valid positions -> pooled, normalised, cast."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import failed_precondition, invalid_argument
from ..models.model_file import POOLINGS, REPRESENTATIONS
from ..models.registry import Model
from .request import EmbedOptions

# Output dtypes by name, as numpy stores them. The compact ones quantise each pooled vector (see `quantize`).
DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "int8": np.dtype("i1"), "uint8": np.dtype("u1"),
          "binary": np.dtype("i1"), "ubinary": np.dtype("u1")}
COMPACT = ("int8", "uint8", "binary", "ubinary")


def quantize(vectors: np.ndarray, dtype: str) -> np.ndarray:
    """float32 vectors (the last axis) -> a compact dtype. int8: each vector scaled so that its largest component
    is +-127, then rounded (per-vector absmax: compare int8 vectors by cosine); uint8: int8 + 128. binary and
    ubinary: the sign bits (1 where the component is > 0), packed 8 to a byte, first dimension in the high bit
    (numpy.packbits; compare by Hamming distance); ubinary holds the bytes, binary the bytes - 128 as int8."""
    if dtype in ("int8", "uint8"):
        scale = 127.0 / np.maximum(np.abs(vectors).max(axis=-1, keepdims=True), 1e-12)
        q = np.rint(vectors * scale).astype(np.int8)
        return q if dtype == "int8" else (q.astype(np.int16) + 128).astype(np.uint8)
    bits = np.packbits(vectors > 0, axis=-1)
    return bits if dtype == "ubinary" else (bits.astype(np.int16) - 128).astype(np.int8)


@dataclass(frozen=True)
class OutputOptions:
    output: str = REPRESENTATIONS["last"]  # graph output name
    pooling: str = "mean"  # none | mean | cls
    normalize: bool = False
    dtype: np.dtype = DTYPES["float32"]
    compact: str = ""  # one of COMPACT: quantise the vectors ('' : cast to dtype)

    def __call__(self, hidden: np.ndarray) -> np.ndarray:
        """[positions, hidden] -> [hidden] (mean, cls) or [positions, hidden] (none), little-endian C order."""
        return self.finish_batch(hidden[None], np.array([len(hidden)]))[0]

    def finish_batch(self, hidden: np.ndarray, positions: np.ndarray) -> list[np.ndarray]:
        """A batch's [inputs, width, hidden] output, each input valid on its first `positions[i]` rows -> one
        array per input (little-endian, C order). Pooling, normalising and casting run on the batch at once."""
        h = np.asarray(hidden, dtype=np.float32)
        if self.pooling == "none":
            return [self.finish_vectors(h[i, :n]) for i, n in enumerate(positions)]
        if self.pooling == "mean" and bool((positions == h.shape[1]).all()):
            pooled = h.mean(axis=1)  # no padding in the batch (equal lengths): the cheaper plain mean
        elif self.pooling == "mean":
            counts = np.maximum(positions, 1)[:, None]
            weights = (np.arange(h.shape[1]) < counts).astype(np.float32) / counts
            pooled = np.einsum("bl,bld->bd", weights, h)  # [inputs, hidden]: padded rows weigh 0
        else:
            pooled = h[:, 0]
        return list(self.finish_vectors(pooled))  # rows of one C-order array: each is C order itself

    def finish_vectors(self, h: np.ndarray) -> np.ndarray:
        """Vectors (the last axis) normalised if asked, then cast to the output dtype or quantised, little-endian
        C order."""
        if self.normalize:
            norm = np.linalg.norm(h, axis=-1, keepdims=True)
            h = h / np.maximum(norm, 1e-12)
        if self.compact:
            return np.ascontiguousarray(quantize(h, self.compact))
        return np.ascontiguousarray(h, dtype=self.dtype)


def output_options(model: Model, options: EmbedOptions) -> OutputOptions:
    """Validate a request's options against the model; raises ServeError."""
    if options.pooling not in POOLINGS:
        raise invalid_argument(f"unknown pooling {options.pooling} (one of {', '.join(POOLINGS)})")
    if options.representation not in REPRESENTATIONS:
        raise invalid_argument(f"unknown representation {options.representation} "
                               f"(one of {', '.join(REPRESENTATIONS)})")
    if options.dtype not in DTYPES:
        raise invalid_argument(f"unknown dtype {options.dtype} (one of {', '.join(DTYPES)})")
    if options.dtype in COMPACT and options.pooling == "none":
        raise invalid_argument(f"dtype {options.dtype} is for pooled vectors: use pooling mean or cls, or a float "
                               "dtype with pooling none")
    if options.representation not in model.outputs:
        raise failed_precondition(f"model {model.name} has no {options.representation} representation")
    if options.pooling not in model.meta.representations[options.representation].poolings:
        # the model file says so: an instance-normalised target space has a mean over time of ~0
        raise invalid_argument(f"{model.modality} target space is normalised over time per utterance, so "
                               f"{options.pooling} pooling carries no information; use pooling=none or "
                               "representation=last")
    return OutputOptions(model.outputs[options.representation], options.pooling, options.normalize,
                         DTYPES[options.dtype], options.dtype if options.dtype in COMPACT else "")
