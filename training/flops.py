"""Model FLOPs of a training update, counted as the server counts them, and the device's peak for MFU.

The server sizes its batches with `flop_per_position` (d2v_serve/models/registry.py: 24 d^2 per layer and position, the
Transformer's multiply-adds x 2, attention scores aside). A training update costs that for every position the student
encodes, three times (forward and backward), plus once for every position the teacher encodes (forward only).
MFU is those FLOPs per second over the device's dense bf16 peak; on a CPU, or a GPU not listed, there is no
published peak and MFU is reported only when `peak_tflops` is set.
"""

from __future__ import annotations

import torch

from d2v_serve.models.registry import flop_per_position

from .models import EncoderConfig

# dense bf16 tensor-core peaks (vendor data sheets), matched against torch.cuda.get_device_name
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def position_flops(enc: EncoderConfig) -> float:
    return flop_per_position(enc)  # type: ignore[arg-type] - it reads only hidden_size and num_layers


def update_flops(enc: EncoderConfig, student_positions: int, teacher_positions: int) -> float:
    return position_flops(enc) * (3 * student_positions + teacher_positions)


def peak_flops(device: torch.device, peak_tflops: float | None = None) -> float | None:
    """FLOP/s to measure MFU against: `peak_tflops` when given, else the listed GPU's, else None."""
    if peak_tflops:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in GPU_PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None
