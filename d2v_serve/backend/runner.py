"""ONNX Runtime sessions: CUDA when it really is active (checked on the session), else CPU; IOBinding on CUDA."""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from . import ort_log

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass
class RuntimeSettings:
    device: str = "auto"  # auto | cuda | cpu
    intra_op_threads: int = 1
    gpu_mem_limit_bytes: int = 0  # 0: ORT's default (no limit)
    device_id: int = 0


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def gpu_memory_bytes(device_id: int = 0) -> int:
    """Total memory of a GPU by nvidia-smi, 0 when unknown (no torch or NVML binding in the serving install)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return 0
    try:
        out = subprocess.run([exe, "--query-gpu=memory.total", "--format=csv,noheader,nounits", f"-i={device_id}"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return int(float(out.split()[0]) * 2**20)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return 0


@functools.cache
def _warn_cpu_fallback(reason: str) -> None:
    log.warning("CUDA is not usable; running on the CPU", extra={"reason": reason})


def _why_not_cuda(lines: list[ort_log.OrtLine]) -> str:
    """ORT's first complaint, without its source-location prefix."""
    if not lines:
        return "onnxruntime gave no reason"
    worst = max(lines, key=lambda line: line.level)
    return re.sub(r"^.*\[ONNXRuntimeError\] : \d+ : \w+ : ", "", worst.message)[:400]


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = max(1, intra_op_threads)
    so.inter_op_num_threads = 1
    so.enable_mem_pattern = False  # shapes change from batch to batch
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 4  # see ort_log: run failures come back as exceptions, not log lines
    return so


def cuda_options(settings: RuntimeSettings) -> dict[str, str]:
    opts = {
        "device_id": str(settings.device_id),
        "cudnn_conv_algo_search": "HEURISTIC",  # EXHAUSTIVE re-benchmarks every new shape
        "do_copy_in_default_stream": "1",
        "arena_extend_strategy": "kSameAsRequested",
    }
    if settings.gpu_mem_limit_bytes > 0:
        opts["gpu_mem_limit"] = str(int(settings.gpu_mem_limit_bytes))
    return opts


def create_session(path: str, settings: RuntimeSettings, prefer_cpu: bool = False) -> ort.InferenceSession:
    """A session on CUDA when asked for (or `auto`) and it really runs there, else on CPU.

    `prefer_cpu` (int8 models) keeps `auto` on CPU. `cuda` raises RuntimeError when CUDA is not active.
    """
    so = session_options(settings.intra_op_threads)
    want_cuda = settings.device == "cuda" or (settings.device == "auto" and not prefer_cpu)
    lines: list[ort_log.OrtLine] = []
    if want_cuda and CUDA in ort.get_available_providers():
        # onnxruntime-gpu lists CUDA even without a GPU or its libraries; the session then falls back to CPU after
        # logging why. In auto mode that is expected: ORT's lines go to DEBUG, and one warning carries the reason.
        with ort_log.captured(lines):
            session = ort.InferenceSession(path, so, providers=[(CUDA, cuda_options(settings)), CPU])
        session.disable_fallback()  # a CUDA failure while running raises; never a silent switch to CPU mid-serving
        fell_back = session.get_providers()[0] != CUDA
        ort_log.emit(lines, expected=fell_back and settings.device == "auto")
        if not fell_back:
            return session
        if settings.device == "cuda":
            raise RuntimeError(f"{path}: CUDA was requested but is not active: {_why_not_cuda(lines)}")
        _warn_cpu_fallback(_why_not_cuda(lines))
        return session  # already a CPU session with the same options
    elif settings.device == "cuda":
        raise RuntimeError(f"CUDA was requested but this onnxruntime has no CUDA provider "
                           f"({', '.join(ort.get_available_providers())})")
    with ort_log.captured(lines):
        session = ort.InferenceSession(path, so, providers=[CPU])
    ort_log.emit(lines)
    return session


class Runner:
    """Runs one session; fetches only the outputs asked for. Not thread-safe by design: one run at a time."""

    def __init__(self, session: ort.InferenceSession, io_binding: bool | None = None) -> None:
        """`io_binding`: bind inputs and outputs explicitly (default: on CUDA only)."""
        self.session = session
        self.provider = session.get_providers()[0]
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self.io_binding = self.on_cuda if io_binding is None else io_binding

    @property
    def on_cuda(self) -> bool:
        return self.provider == CUDA

    def run(self, feeds: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        if not self.io_binding:
            return dict(zip(outputs, self.session.run(list(outputs), feeds), strict=True))
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in outputs:  # copied back to host: only what a request asked for
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return dict(zip(outputs, binding.copy_outputs_to_cpu(), strict=True))
