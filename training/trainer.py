"""The training loop: build student, teacher, head, optimizer and data from a resolved config, then step.

    trainer = Trainer(cfg)                 # cfg: a resolved TrainConfig (config.resolve_config, cli.py)
    trainer.run()                          # steps, logs DIR/metrics.jsonl, writes DIR/ckpt.pt atomically

One update = `accum` micro-batches (forward + backward, DDP gradient sync on the last one), gradient clipping, one
AdamW step at the scheduled lr, then the EMA teacher step. Everything random is seeded: masks from
(seed, step, micro, rank), data from (seed, batch index), dropout from the torch generator whose state the
checkpoint carries, so an interrupted and resumed run reproduces the uninterrupted one (bitwise on CPU).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from d2v_serve.preprocess import AudioPreprocessing, ImagePreprocessing, TextPreprocessing, preprocessing_from_dict

from . import distributed
from .augment import ImageAugment
from .checkpoint import encoder_config, initial_encoder, make_checkpoint, save_checkpoint
from .config import CONFIG_VERSION, ConfigError, TrainConfig, resolve_derived
from .data import BatchStream, DataConfig, build_text_preprocessing, open_dataset
from .data_sources import find_sources
from .flops import peak_flops, update_flops
from .models import EncoderConfig, build_encoder
from .objectives import get_objective
from .plots import plot_training_curves
from .schedules import ema_decay, learning_rate

CKPT_NAME = "ckpt.pt"
METRICS_NAME = "metrics.jsonl"
WALL_CLOCK = ("elapsed_s", "samples_per_s", "model_flops_per_s", "mfu")
_MASK_TAG, _TORCH_TAG = 7, 11  # seed-sequence tags: masks and the dropout generator draw from independent streams


class CollapseError(RuntimeError):
    """The collapse guard fired: the message is one line naming the variable, its threshold and the step."""


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: dict[str, Any] | None = None, init: dict[str, Any] | None = None,
                 dist: distributed.Dist | None = None) -> None:
        self.cfg = cfg
        self.dist = dist or distributed.setup(cfg.device)
        self.device = self.dist.device
        self.out = Path(cfg.out) if cfg.out else None
        modality = cfg.modality
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank

        self.preprocessing = self._preprocessing(resume, init)
        self.enc_cfg = self._encoder_config(resume, init)
        resolve_derived(cfg, self.enc_cfg.hidden_size, self.enc_cfg.num_patches if modality == "image" else None)

        if resume is None and init is None:
            student = initial_encoder(self.enc_cfg, cfg.seed, cfg.init_std)
        else:
            student = build_encoder(self.enc_cfg)
            student.load_state_dict((resume or init)["model"])
        kind = get_objective(cfg.objective).Objective
        self.objective = kind.from_config(student, cfg)  # head / decoder initialised here (seeded)
        if resume is not None:
            self.objective.load_training_state(resume["training"])
        self.objective.to(self.device)
        self.model: nn.Module = self.objective
        if self.dist.enabled:
            self.model = DistributedDataParallel(
                self.objective, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                forward_sync_buffers=False, find_unused_parameters=self.enc_cfg.layerdrop > 0)

        self.params = [p for p in self.objective.parameters() if p.requires_grad]
        self.optimizer = self.objective.configure_optimizer(cfg, self.device.type)
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.step = 0
        if resume is not None:
            tr = resume["training"]
            self.optimizer.load_state_dict(tr["optimizer"])
            if tr.get("scaler"):
                self.scaler.load_state_dict(tr["scaler"])
            self.step = int(tr["step"])

        self.dataset = self._dataset()
        pre = TextPreprocessing.from_dict(self.preprocessing) if modality == "text" else None
        self.masker = kind.masker(cfg, self.enc_cfg, pre)
        data = cfg.data
        self.stream = BatchStream(self.dataset, cfg.batch_size, cfg.seed, data.max_batch_cost, data.bucket_batches,
                                  data.pad_audio, data.num_workers, data.prefetch)
        self.flops = 0.0  # model FLOPs since this invocation started (training/flops.py), for MFU
        self.peak_flops = peak_flops(self.device, cfg.peak_tflops)
        self._batches = None
        self.samples = 0 if resume is None else int(resume["training"].get("samples", 0))
        self._restore_rng(resume)

    # ------------------------------------------------------------------------------------------------ building

    def _preprocessing(self, resume: dict | None, init: dict | None) -> dict[str, Any]:
        cfg, modality = self.cfg, self.cfg.modality
        for ckpt in (resume, init):
            if ckpt is not None:
                if ckpt["modality"] != modality:
                    raise ConfigError(f"checkpoint is {ckpt['modality']}, this run trains {modality}")
                return dict(ckpt["preprocessing"])
        if modality == "audio":
            return AudioPreprocessing().to_dict()
        if modality == "image":
            size = self._preset_config().image_size
            return ImagePreprocessing(image_size=size, resize_size=size).to_dict()
        preset = self._preset_config()
        vocab = cfg.data.vocab_size or preset.vocab_size
        max_length = cfg.data.text_max_length or preset.max_positions - 2
        pre = None
        if self.dist.is_main:  # one tokenizer for every rank: trained on rank 0, then broadcast
            sources = find_sources("text", cfg.data.path)
            pre = build_text_preprocessing(sources, vocab, max_length, cfg.data.min_frequency).to_dict()
        return distributed.broadcast_object(pre, self.dist)

    def _preset_config(self) -> EncoderConfig:
        return EncoderConfig.preset(self.cfg.modality, self.cfg.preset, self.cfg.teacher.target_layers_of_12,
                                    **self.cfg.model)

    def _encoder_config(self, resume: dict | None, init: dict | None) -> EncoderConfig:
        if resume is not None:
            return encoder_config(resume)
        if init is not None:
            enc = encoder_config(init).replace(**self.cfg.model)
        else:
            enc = self._preset_config()
        if self.cfg.modality == "text":
            pre = TextPreprocessing.from_dict(self.preprocessing)
            if init is None:
                enc = enc.replace(vocab_size=pre.vocab_size, pad_id=pre.pad_id)
            if pre.vocab_size > enc.vocab_size or pre.max_length + 2 > enc.max_positions:
                raise ConfigError(f"tokenizer ({pre.vocab_size} ids, {pre.max_length} tokens) does not fit the "
                                  f"model ({enc.vocab_size} ids, {enc.max_positions} positions)")
        return enc

    def _amp_dtype(self) -> torch.dtype | None:
        precision, cuda = self.cfg.precision, self.device.type == "cuda"
        if precision == "auto":
            if cuda:
                return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.bfloat16 if self.cfg.cpu_bf16 else None
        if precision == "fp16" and not cuda:
            raise ConfigError("fp16 autocast needs a CUDA device; use bf16 or fp32 on CPU")
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def _dataset(self) -> Any:
        cfg, data = self.cfg, self.cfg.data
        names = {f for f in DataConfig.__dataclass_fields__ if f != "image_augment"}
        options = {k: getattr(data, k) for k in names if getattr(data, k) is not None}
        if cfg.modality == "image":
            options["image_augment"] = ImageAugment(tuple(data.crop_scale), tuple(data.crop_ratio), data.hflip)
        pre = preprocessing_from_dict(cfg.modality, self.preprocessing)
        return open_dataset(cfg.modality, data.path, pre, DataConfig(**options))

    # ------------------------------------------------------------------------------------------------ stepping

    def batches(self) -> Any:
        if self._batches is None:
            start = self.step * self.cfg.accum
            self._batches = self.stream.iterate(start, self.dist.rank, self.dist.world_size)
        return self._batches

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        def move(x: Any) -> Any:
            if isinstance(x, dict):
                return {k: move(v) for k, v in x.items()}
            return torch.from_numpy(np.ascontiguousarray(x)).to(self.device, non_blocking=True)
        return move(batch)

    def train_step(self) -> dict[str, float]:
        """One optimizer update; returns the step's metrics (averaged over micro-batches and ranks)."""
        cfg, d = self.cfg, self.dist
        accum = cfg.accum
        lr = learning_rate(self.step, cfg.steps, cfg.optimizer.lr, cfg.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.model.train()
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)
        items = 0
        for micro in range(accum):
            np_batch = next(self.batches())
            rng = np.random.default_rng([cfg.seed, _MASK_TAG, self.step, micro, d.rank])
            batch = self._to_device(self.masker(np_batch, rng))
            items += items_in(np_batch)
            mask = batch["mask"]
            student = batch["keep"].numel() if "keep" in batch else mask.numel()
            self.flops += update_flops(self.enc_cfg, student, items_in(np_batch) * mask.shape[1]) * d.world_size
            last = micro == accum - 1
            sync = nullcontext() if last or not d.enabled else self.model.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    out = self.model(**batch)
                self.scaler.scale(out.loss / accum).backward()
            s = out.stats
            totals += torch.stack([out.loss.detach().double(), s["target_var"].double(), s["pred_var"].double(),
                                   s["masked"].double()])
        self.scaler.unscale_(self.optimizer)
        clip = cfg.optimizer.clip_grad
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        decay = ema_decay(self.step, cfg.ema.decay, cfg.ema.end_decay, cfg.ema.anneal_steps)
        self.objective.update_teacher(decay)
        totals[:3] /= accum
        totals = distributed.all_reduce_mean(torch.cat([totals, grad_norm.detach().double().reshape(1)]), d)
        loss, tvar, pvar, masked, gnorm = totals.tolist()
        self.samples += items * d.world_size
        return {"step": self.step, "loss": loss, "lr": lr, "ema_decay": decay, "target_var": tvar,
                "pred_var": pvar, "masked": masked, "grad_norm": gnorm, "samples": self.samples}

    def check_collapse(self, m: dict[str, float]) -> None:
        g = self.cfg.guard
        if self.step <= g.after:
            return
        for name, key in (("target_var", "min_target_var"), ("pred_var", "min_pred_var")):
            if not m[name] >= getattr(g, key):  # NaN fails too
                raise CollapseError(f"collapse guard: {name} {m[name]:.4g} fell below {key}={getattr(g, key)} at "
                                    f"step {self.step} (guard active after {g.after} updates)")

    # ------------------------------------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        cfg, d = self.cfg, self.dist
        total = cfg.steps
        stop = min(total, cfg.stop_at) if cfg.stop_at else total
        log = self._open_log()
        bar = None
        if d.is_main and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=self.step, desc=f"d2v-train {cfg.modality}", dynamic_ncols=True,
                       file=sys.stderr)
        start, start_samples, self.flops = time.perf_counter(), self.samples, 0.0
        metrics: dict[str, Any] = {}
        try:
            while self.step < stop:
                metrics = self.train_step()
                elapsed = time.perf_counter() - start
                metrics["elapsed_s"] = round(elapsed, 3)
                metrics["samples_per_s"] = round((self.samples - start_samples) / max(elapsed, 1e-9), 2)
                flops_per_s = self.flops / max(elapsed, 1e-9)
                metrics["model_flops_per_s"] = float(f"{flops_per_s:.4g}")
                metrics["mfu"] = None if self.peak_flops is None else float(f"{flops_per_s / self.peak_flops:.4g}")
                if log is not None and (self.step % cfg.log_every == 0 or self.step == stop):
                    log.write(json.dumps(metrics) + "\n")
                    log.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                    ema=f"{metrics['ema_decay']:.5f}", tvar=f"{metrics['target_var']:.3f}")
                self.check_collapse(metrics)
                if self.step % cfg.save_every == 0 or self.step == stop:
                    self.save(metrics)
            if self.step == 0:  # --steps 0: the initial weights, a baseline for d2v-eval
                self.save(metrics)
        finally:
            if bar is not None:
                bar.close()
            if log is not None:
                log.close()
            self.close()
            if cfg.plot:
                self.plot()  # also after a collapse or an interrupt: that is when the curves matter most
        digests = distributed.all_gather_objects(self.param_digest(), d)
        summary = {"event": "end", "step": self.step, "param_digests": digests,
                   "ranks_in_sync": len(set(digests)) == 1, "last": metrics}
        if d.is_main and self.out is not None:
            with (self.out / METRICS_NAME).open("a", encoding="utf-8") as f:
                f.write(json.dumps(summary) + "\n")
        return summary

    def plot(self) -> None:
        """Training curves beside metrics.jsonl (rank 0); a failed plot never fails the run."""
        if not self.dist.is_main or self.out is None or not (self.out / METRICS_NAME).exists():
            return
        try:
            plot_training_curves(self.out / METRICS_NAME)
        except Exception as e:  # noqa: BLE001 - matplotlib missing or a backend problem: the run itself is fine
            print(f"d2v-train: note: no training curves ({' '.join(str(e).split())[:200]})", file=sys.stderr)

    def close(self) -> None:
        """Stop the data threads (a later step starts a fresh stream at the current position)."""
        if self._batches is not None:
            self._batches.close()
            self._batches = None

    def _open_log(self) -> Any:
        """Rank 0 appends to DIR/metrics.jsonl, first dropping lines past the step it resumes from."""
        if not self.dist.is_main or self.out is None:
            return None
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / METRICS_NAME
        if path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and _logged_step(line) <= self.step]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            tmp.replace(path)
        return path.open("a", encoding="utf-8")

    def checkpoint(self, metrics: dict[str, Any]) -> dict[str, Any] | None:
        """The checkpoint dict (on rank 0; None elsewhere). Every rank must call it: RNG states are gathered."""
        d, cfg = self.dist, self.cfg
        rng = distributed.all_gather_objects(_rng_state(self.device), d)
        if not d.is_main:
            return None
        training = {
            "step": self.step,
            "samples": self.samples,
            "optimizer": _cpu(self.optimizer.state_dict()),
            "scheduler": {"name": cfg.schedule.name, "step": self.step,
                          "lr": learning_rate(self.step, cfg.steps, cfg.optimizer.lr, cfg.schedule)},
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "objective": cfg.objective,
            **_cpu(self.objective.training_state()),  # teacher, and head (data2vec) or decoder (data2vec2)
            "ema": {"decay": metrics.get("ema_decay"), "updates": self.step, "start": cfg.ema.decay,
                    "end": cfg.ema.end_decay, "anneal_steps": cfg.ema.anneal_steps},
            "rng": {"torch": [r["torch"] for r in rng], "cuda": [r["cuda"] for r in rng]},
            "data": {"micro_step": self.step * cfg.accum, "world_size": d.world_size, "seed": cfg.seed,
                     "batch_size": cfg.batch_size},
            "world_size": d.world_size,
            # wall-clock figures stay in metrics.jsonl, so that the same run gives a byte-identical checkpoint
            "metrics": {k: v for k, v in metrics.items()
                        if isinstance(v, int | float) and k not in WALL_CLOCK},
            "config": cfg.to_dict(),
            "config_version": CONFIG_VERSION,
        }
        return make_checkpoint(self.enc_cfg, self.objective.student.state_dict(), self.preprocessing, training)

    def save(self, metrics: dict[str, Any]) -> None:
        ckpt = self.checkpoint(metrics)
        if ckpt is not None and self.out is not None:
            save_checkpoint(self.out / CKPT_NAME, ckpt)

    def param_digest(self) -> str:
        h = hashlib.sha256()
        for name, t in sorted(self.objective.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def _restore_rng(self, resume: dict | None) -> None:
        """Dropout draws: a fresh per-rank seed, or exactly the saved generator state on resume."""
        d = self.dist
        saved = None if resume is None else resume["training"].get("rng")
        if saved is not None and len(saved["torch"]) == d.world_size:
            torch.set_rng_state(saved["torch"][d.rank])
            if self.device.type == "cuda" and saved["cuda"][d.rank] is not None:
                torch.cuda.set_rng_state(saved["cuda"][d.rank], self.device)
            return
        if saved is not None:
            print(f"d2v-train: resuming with {d.world_size} ranks from a run with {len(saved['torch'])}: "
                  "dropout draws and data order will differ from the original run", file=sys.stderr)
        seed = int(np.random.SeedSequence([self.cfg.seed, _TORCH_TAG, d.rank, self.step]).generate_state(1)[0])
        torch.manual_seed(seed)


def items_in(batch: dict[str, Any]) -> int:
    return int(next(iter(batch.values())).shape[0])


def _rng_state(device: torch.device) -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def _cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _logged_step(line: str) -> float:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return math.inf  # a torn last line from a kill: drop it
    return record.get("step", math.inf) if record.get("event") is None else math.inf
