"""Parity between torch and ONNX Runtime: max abs difference on valid positions, pooled cosine, equal masks."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from d2v_serve.preprocess import masked_mean

HIDDEN = ("last_hidden_state", "target_hidden_state")
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def torch_reference(module: torch.nn.Module, batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    results = []
    with torch.no_grad():
        for inputs in batches:
            outs = module(**{k: torch.from_numpy(v) for k, v in inputs.items()})
            results.append({name: t.numpy() for name, t in zip((*HIDDEN, "output_mask"), outs, strict=True)})
    return results


def session(model: bytes, provider: str = CPU) -> ort.InferenceSession:
    """An ORT session on one provider; `get_providers()` says whether that provider really took the graph."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # keep ORT's warnings (e.g. fp16 Cast nodes placed on CPU) off the user's terminal
    providers = [provider, CPU] if provider != CPU else [CPU]
    return ort.InferenceSession(model, sess_options=opts, providers=providers)


def run(sess: ort.InferenceSession, batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    names = [o.name for o in sess.get_outputs()]
    return [dict(zip(names, sess.run(None, inputs), strict=True)) for inputs in batches]


def compare(reference: list[dict[str, np.ndarray]], got: list[dict[str, np.ndarray]],
            pooled_target: bool = True) -> dict[str, Any]:
    """Figures over all batches: worst max abs diff on valid positions, worst pooled cosine (mean over valid
    positions, per item) and worst item cosine (all valid positions of an item as one vector) per hidden output;
    masks equal. `cosine` is the figure the gates use: the pooled cosine, except for a target space whose mean over
    time is zero by construction (instance norm per channel), where the item cosine stands in for it."""
    diff = dict.fromkeys(HIDDEN, 0.0)
    pooled_cos = dict.fromkeys(HIDDEN, 1.0)
    item_cos = dict.fromkeys(HIDDEN, 1.0)
    masks_equal = True
    finite = True
    for ref, out in zip(reference, got, strict=True):
        mask = ref["output_mask"]
        masks_equal &= out["output_mask"].dtype == np.int64 and np.array_equal(out["output_mask"], mask)
        valid = mask.astype(bool)
        w = valid[..., None]
        for name in HIDDEN:
            o, r = out[name], ref[name]
            if o.shape != r.shape:
                raise ValueError(f"{name} has shape {o.shape}, torch gives {r.shape}")
            finite &= bool(np.isfinite(o[valid]).all())
            diff[name] = max(diff[name], float(np.abs(o[valid] - r[valid]).max()))
            pooled_cos[name] = min(pooled_cos[name], min_cosine(masked_mean(o, mask), masked_mean(r, mask)))
            flat_o = (o.astype(np.float64) * w).reshape(len(o), -1)
            flat_r = (r.astype(np.float64) * w).reshape(len(r), -1)
            item_cos[name] = min(item_cos[name], min_cosine(flat_o, flat_r))
    cosine = min(pooled_cos["last_hidden_state"],
                 pooled_cos["target_hidden_state"] if pooled_target else item_cos["target_hidden_state"])
    if not pooled_target:  # a zero vector up to rounding: its cosine says nothing
        del pooled_cos["target_hidden_state"]
    return {"max_abs_diff": diff, "pooled_cosine": pooled_cos, "item_cosine": item_cos, "cosine": cosine,
            "output_mask_equal": bool(masks_equal), "finite": finite}


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
    return float(np.nan_to_num(cos, nan=-1.0).min())


def worst_diff(result: dict[str, Any]) -> float:
    return max(result["max_abs_diff"].values())


def rounded(result: dict[str, Any], cosine: bool = False) -> dict[str, Any]:
    """Figures for the file's metadata with few digits, so reruns of an export write the same bytes:
    cosines to 6 decimals, differences to 3 significant digits."""
    out: dict[str, Any] = {}
    for key, value in result.items():
        is_cosine = cosine or "cosine" in key
        if isinstance(value, dict):
            out[key] = rounded(value, is_cosine)
        elif isinstance(value, float) and key != "tolerance":
            out[key] = round(value, 6) if is_cosine else float(f"{value:.3g}")
        else:
            out[key] = value
    return out
