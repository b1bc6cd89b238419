"""What the server is measured against, each run in a fresh process: raw ONNX Runtime on the same model file and
inputs, torch eager on the same weights, and the machine's matrix-multiply peak; plus model FLOP counts."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a new interpreter: nothing measured before (threads, torch, memory) weighs on it."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def median_seconds(fn: Callable[[], Any], repeat: int) -> float:
    """Median wall time of `repeat` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---- raw ONNX Runtime on the workload's inputs ----------------------------------------------------------------


def prepared_inputs(model_file: Path, workload_name: str, n: int, seed: int = 0) -> tuple[dict, list[np.ndarray]]:
    """The model's metadata and the workload's first `n` inputs, preprocessed as the server would."""
    from bench.workloads import WORKLOADS
    from d2v_serve.client import Image
    from d2v_serve.models.model_file import read_metadata
    from d2v_serve.preprocess import decode_image, preprocessing_from_dict

    meta = read_metadata(model_file)
    workload = WORKLOADS[workload_name]
    pre = preprocessing_from_dict(meta.modality, meta.preprocessing)
    out = []
    for x in workload.inputs(meta, n, seed):
        if isinstance(x, str):
            out.append(pre.prepare(x))
        elif isinstance(x, Image):
            out.append(pre.prepare(decode_image(x.data)))
        else:
            out.append(pre.prepare(x.samples, x.sample_rate))
    return meta, out


def raw_ort(model_file: Path, workload_name: str, batches: list[int], duration: float, threads: int,
            device: str = "cpu", sort_by_length: bool = False, cpus: str = "") -> list[dict[str, Any]]:
    """Items/s (and items per CPU-second) of the model file run directly (one session with the server's
    settings) on the workload's inputs, for each batch size in turn (each for `duration` seconds and at least two
    batches). `sort_by_length` forms batches of neighbours in length (what an ideal offline batcher does);
    `cpus` pins this process like the server."""
    if cpus:
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    from d2v_serve.backend.runner import Runner, create_session
    from d2v_serve.config import ServerConfig
    from d2v_serve.models.registry import runtime_settings
    from d2v_serve.preprocess import collate

    meta, items = prepared_inputs(model_file, workload_name, max(4 * max(batches), 64))
    if sort_by_length:
        items = sorted(items, key=len)
    settings = runtime_settings(ServerConfig(intra_op_threads=threads, device=device), 1)
    runner = Runner(create_session(str(model_file), settings, prefer_cpu=meta.precision == "int8"))
    pad_id = meta.preprocessing.get("pad_id", 1)
    outputs = ["last_hidden_state", "output_mask"]
    results = []
    for batch in batches:
        feeds = [collate(meta.modality, items[i: i + batch], pad_id)
                 for i in range(0, len(items) - batch + 1, batch)]
        # a short run covers only the first batches: in a random order they sample every length, not the shortest
        feeds = [feeds[k] for k in np.random.default_rng(batch).permutation(len(feeds))]
        runner.run(feeds[0], outputs)  # warm-up
        done = valid = positions = 0
        start, cpu, i = time.perf_counter(), time.process_time(), 0
        while time.perf_counter() - start < duration or done < 2 * batch:
            mask = runner.run(feeds[i % len(feeds)], outputs)["output_mask"]
            done, valid, positions = done + batch, valid + int(mask.sum()), positions + mask.size
            i += 1
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        results.append({"batch": batch, "items_per_s": round(done / seconds, 3),
                        "items_per_cpu_s": round(done / cpu, 3) if cpu > 0 else None,
                        "padded_fraction": round(1 - valid / positions, 4), "provider": runner.provider})
    return results


# ---- torch eager vs ONNX Runtime fp32 / int8 ---------------------------------------------------------------


def batch_inputs(cfg: Any, batch: int, length: int) -> dict[str, np.ndarray]:
    """A padded batch of mixed lengths (length/2 .. length samples or tokens); images: random pixels."""
    rng = np.random.default_rng(0)
    if cfg.modality == "image":
        return {"pixel_values": rng.standard_normal((batch, 3, cfg.image_size, cfg.image_size)).astype(np.float32)}
    lengths = np.linspace(length // 2, length, batch).astype(int)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    if cfg.modality == "audio":
        values = (rng.standard_normal((batch, length)) * mask).astype(np.float32)
        return {"input_values": values, "attention_mask": mask}
    ids = np.where(mask == 1, rng.integers(3, cfg.vocab_size, (batch, length)), cfg.pad_id).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def torch_vs_ort(checkpoint: Path, model_files: dict[str, Path], batch: int, length: int, threads: int,
                 repeat: int) -> dict[str, Any]:
    """Median seconds per batch of torch eager and of ORT on each model file (fp32, int8, ...) at `threads`
    threads each, and each file's pooled cosine against torch fp32 (min over the batch)."""
    import onnxruntime as ort
    import torch

    from d2v.export.graph import graph_module
    from d2v.training.checkpoint import load_checkpoint, load_encoder
    from d2v.training.models import EncoderConfig
    from d2v_serve.backend.runner import session_options  # the server's: what it runs is what is compared
    from d2v_serve.preprocess import masked_mean

    torch.set_num_threads(threads)
    ckpt = load_checkpoint(checkpoint)
    cfg = EncoderConfig.from_dict(ckpt["config"])
    module = graph_module(load_encoder(ckpt), cfg)
    inputs = batch_inputs(cfg, batch, length)
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        hidden, _, mask = module(**tensors)
        reference = masked_mean(hidden.numpy(), mask.numpy())
        out: dict[str, Any] = {"batch": batch, "length": length, "threads": threads,
                               "torch_s": round(median_seconds(lambda: module(**tensors), repeat), 4)}
    for name, path in model_files.items():
        session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
        hidden, mask = session.run(["last_hidden_state", "output_mask"], inputs)
        out[f"{name}_s"] = round(median_seconds(lambda s=session: s.run(None, inputs), repeat), 4)
        out[f"{name}_cosine"] = round(float(cosines(masked_mean(hidden, mask), reference).min()), 6)
    return out


# ---- the machine's matmul peak and the models' FLOPs ---------------------------------------------------------


def gemm_peak(threads: int, n: int = 1024, repeat: int = 10) -> dict[str, Any]:
    """float32 matmul FLOP/s of numpy's BLAS on `threads` threads (best of `repeat` n x n products)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    with threadpool_limits(threads, user_api="blas"):
        a @ b
        best = min(_timed(lambda: a @ b) for _ in range(repeat))
        cpu = time.process_time()
        for _ in range(repeat):
            a @ b
        cpu = (time.process_time() - cpu) / repeat
    info = [{k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
            for i in threadpool_info() if i.get("user_api") == "blas"]
    return {"gflops": round(2 * n**3 / best / 1e9, 2), "gflops_per_cpu_s": round(2 * n**3 / cpu / 1e9, 2), "n": n,
            "threads": threads, "blas": info}


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def transformer_flops(cfg: dict[str, Any], positions: float) -> float:
    """Multiply-adds x 2 of the Transformer blocks on one input of `positions` positions."""
    h, f, layers = cfg["hidden_size"], cfg["ffn_size"], cfg["num_layers"]
    return layers * (2 * positions * (4 * h * h + 2 * h * f) + 4 * positions * positions * h)


def model_flops(cfg: dict[str, Any], length: float) -> float:
    """FLOPs of one input: text `length` tokens, audio `length` samples (conv front end, projection, positional
    convs and the blocks), image (patch embedding and the blocks)."""
    h = cfg["hidden_size"]
    if cfg["modality"] == "text":
        return transformer_flops(cfg, length)
    if cfg["modality"] == "image":
        patches = (cfg["image_size"] // cfg["patch_size"]) ** 2
        embed = 2 * patches * 3 * cfg["patch_size"] ** 2 * h
        return embed + transformer_flops(cfg, patches + 1)
    flops, channels, frames = 0.0, 1, float(length)
    for out_channels, kernel, stride in cfg["conv_layers"]:
        frames = (frames - kernel) // stride + 1
        flops += 2 * frames * kernel * channels * out_channels
        channels = out_channels
    flops += 2 * frames * channels * h  # feature projection
    flops += cfg["pos_conv_layers"] * 2 * frames * cfg["pos_conv_kernel"] * h * h / cfg["pos_conv_groups"]
    return flops + transformer_flops(cfg, frames)
