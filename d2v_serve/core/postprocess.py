"""Per-input output: the requested representation at the valid positions -> pooled, normalised, cast."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import failed_precondition, invalid_argument
from ..models.model_file import POOLINGS, REPRESENTATIONS
from ..models.registry import Model
from .request import EmbedOptions

DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}


@dataclass(frozen=True)
class OutputOptions:
    output: str = REPRESENTATIONS["last"]  # graph output name
    pooling: str = "mean"  # none | mean | cls
    normalize: bool = False
    dtype: np.dtype = DTYPES["float32"]

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
        """Vectors (the last axis) normalised if asked, cast to the output dtype, little-endian C order."""
        if self.normalize:
            norm = np.linalg.norm(h, axis=-1, keepdims=True)
            h = h / np.maximum(norm, 1e-12)
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
    if options.representation not in model.outputs:
        raise failed_precondition(f"model {model.name} has no {options.representation} representation")
    if options.pooling not in model.meta.representations[options.representation].poolings:
        # the model file says so: an instance-normalised target space has a mean over time of ~0
        raise invalid_argument(f"{model.modality} target space is normalised over time per utterance, so "
                               f"{options.pooling} pooling carries no information; use pooling=none or "
                               "representation=last")
    return OutputOptions(model.outputs[options.representation], options.pooling, options.normalize,
                         DTYPES[options.dtype])
