"""The training loop: build student, teacher, head, optimizer and data from a resolved config, then step.

    trainer = Trainer(cfg)                 # cfg: defaults.defaults(modality) + overrides, see cli.py
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
from .data import BatchStream, DataConfig, build_text_preprocessing, open_dataset
from .data_sources import find_sources
from .defaults import ConfigError, resolve_derived
from .masking import BatchMasker, MultiMasker, TokenMasking
from .models import EncoderConfig, build_encoder
from .objective import Data2Vec, LossSpec, TeacherSpec
from .objective2 import Data2Vec2, DecoderSpec
from .plots import plot_training_curves
from .schedules import ema_decay, learning_rate

CKPT_NAME = "ckpt.pt"
METRICS_NAME = "metrics.jsonl"
_MASK_TAG, _TORCH_TAG = 7, 11  # seed-sequence tags: masks and the dropout generator draw from independent streams
NO_DECAY = ("cls_token", "mask_token", "mask_embedding", "rel_pos_bias", "pos_embed")


class CollapseError(RuntimeError):
    """The collapse guard fired: the message is one line naming the variable, its threshold and the step."""


class Trainer:
    def __init__(self, cfg: dict[str, Any], resume: dict[str, Any] | None = None, init: dict[str, Any] | None = None,
                 dist: distributed.Dist | None = None) -> None:
        self.cfg = cfg
        self.dist = dist or distributed.setup(cfg["device"])
        self.device = self.dist.device
        self.out = Path(cfg["out"]) if cfg.get("out") else None
        modality = cfg["modality"]
        torch.manual_seed(cfg["seed"])  # identical initial weights on every rank

        self.preprocessing = self._preprocessing(resume, init)
        self.enc_cfg = self._encoder_config(resume, init)
        resolve_derived(cfg, self.enc_cfg.hidden_size, self.enc_cfg.num_patches if modality == "image" else None)

        if resume is None and init is None:
            student = initial_encoder(self.enc_cfg, cfg["seed"], float(cfg["init_std"]))
        else:
            student = build_encoder(self.enc_cfg)
            student.load_state_dict((resume or init)["model"])
        t = cfg["teacher"]
        teacher_spec = TeacherSpec(tuple(t["drop"]), tuple(t["copy"]), bool(t["reads_student_features"]),
                                   t["mask_param"])
        loss_spec = LossSpec(float(cfg["loss_beta"]), float(cfg["loss_scale"]), cfg["loss_reduce"],
                             int(cfg["head_layers"]), cfg["head_input"])
        self.objective = self._objective(student, teacher_spec, loss_spec)  # head / decoder initialised here (seeded)
        if resume is not None:
            self.objective.load_training_state(resume["training"])
        self.objective.to(self.device)
        self.model: nn.Module = self.objective
        if self.dist.enabled:
            self.model = DistributedDataParallel(
                self.objective, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                forward_sync_buffers=False, find_unused_parameters=self.enc_cfg.layerdrop > 0)

        self.params = [p for p in self.objective.parameters() if p.requires_grad]
        self.optimizer = self._optimizer()
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
        self.masker = self._masker()
        data = cfg["data"]
        self.stream = BatchStream(self.dataset, cfg["batch_size"], cfg["seed"], data["max_batch_cost"],
                                  data["bucket_batches"], data.get("pad_audio", True), data["num_workers"],
                                  data["prefetch"])
        self._batches = None
        self.samples = 0 if resume is None else int(resume["training"].get("samples", 0))
        self._restore_rng(resume)

    # ------------------------------------------------------------------------------------------------ building

    def _objective(self, student: nn.Module, teacher: TeacherSpec, loss: LossSpec) -> Data2Vec:
        cfg = self.cfg
        if cfg.get("objective", "data2vec") == "data2vec":
            return Data2Vec(student, teacher, loss)
        decoder = DecoderSpec(**cfg["decoder"], head_layers=int(cfg["head_layers"]))
        return Data2Vec2(student, teacher, loss, decoder, int(cfg["masking"]["num_masks"]), float(cfg["cls_loss"]))

    def _preprocessing(self, resume: dict | None, init: dict | None) -> dict[str, Any]:
        cfg, modality = self.cfg, self.cfg["modality"]
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
        vocab = cfg["data"].get("vocab_size") or preset.vocab_size
        max_length = cfg["data"].get("text_max_length") or preset.max_positions - 2
        pre = None
        if self.dist.is_main:  # one tokenizer for every rank: trained on rank 0, then broadcast
            sources = find_sources("text", cfg["data"]["path"])
            pre = build_text_preprocessing(sources, vocab, max_length, cfg["data"]["min_frequency"]).to_dict()
        return distributed.broadcast_object(pre, self.dist)

    def _preset_config(self) -> EncoderConfig:
        return EncoderConfig.preset(self.cfg["modality"], self.cfg["preset"], self.cfg.get("target_layers_of_12"),
                                    **self.cfg["model"])

    def _encoder_config(self, resume: dict | None, init: dict | None) -> EncoderConfig:
        if resume is not None:
            return encoder_config(resume)
        if init is not None:
            enc = encoder_config(init).replace(**self.cfg["model"])
        else:
            enc = self._preset_config()
        if self.cfg["modality"] == "text":
            pre = TextPreprocessing.from_dict(self.preprocessing)
            if init is None:
                enc = enc.replace(vocab_size=pre.vocab_size, pad_id=pre.pad_id)
            if pre.vocab_size > enc.vocab_size or pre.max_length + 2 > enc.max_positions:
                raise ConfigError(f"tokenizer ({pre.vocab_size} ids, {pre.max_length} tokens) does not fit the "
                                  f"model ({enc.vocab_size} ids, {enc.max_positions} positions)")
        return enc

    def _optimizer(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for name, p in self.objective.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or any(k in name for k in NO_DECAY) else decay).append(p)
        cfg = self.cfg
        scale, faster = float(cfg["embed_lr_scale"]), []
        if scale != 1.0:  # the token embeddings in a group of their own, stepped at scale x the scheduled lr
            embed = self.objective.student.token_embed.weight
            faster = [{"params": [embed], "weight_decay": float(cfg["weight_decay"]), "lr_scale": scale}]
            decay = [p for p in decay if p is not embed]
        groups = [{"params": decay, "weight_decay": float(cfg["weight_decay"])},
                  {"params": no_decay, "weight_decay": 0.0}, *faster]
        return torch.optim.AdamW(groups, lr=float(cfg["lr"]), betas=tuple(cfg["betas"]), eps=float(cfg["eps"]),
                                 **({"fused": True} if self.device.type == "cuda" else {"foreach": True}))

    def _amp_dtype(self) -> torch.dtype | None:
        precision, cuda = self.cfg["precision"], self.device.type == "cuda"
        if precision == "auto":
            if cuda:
                return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.bfloat16 if self.cfg["cpu_bf16"] else None
        if precision == "fp16" and not cuda:
            raise ConfigError("fp16 autocast needs a CUDA device; use bf16 or fp32 on CPU")
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def _dataset(self) -> Any:
        cfg, data = self.cfg, self.cfg["data"]
        names = {f for f in DataConfig.__dataclass_fields__ if f != "image_augment"}
        options = {k: v for k, v in data.items() if k in names and v is not None}
        if cfg["modality"] == "image":
            options["image_augment"] = ImageAugment(tuple(data["crop_scale"]), tuple(data["crop_ratio"]),
                                                    float(data["hflip"]))
        pre = preprocessing_from_dict(cfg["modality"], self.preprocessing)
        return open_dataset(cfg["modality"], data["path"], pre, DataConfig(**options))

    def _masker(self) -> BatchMasker | MultiMasker:
        modality, options = self.cfg["modality"], self.cfg["masking"]
        if isinstance(self.objective, Data2Vec2):
            return MultiMasker(modality, options, conv_layers=self.enc_cfg.conv_layers, grid=self.enc_cfg.grid_size)
        if modality != "text":
            return BatchMasker(modality, options, conv_layers=self.enc_cfg.conv_layers, grid=self.enc_cfg.grid_size)
        pre = TextPreprocessing.from_dict(self.preprocessing)
        unk = pre.tokenizer.token_to_id("<unk>")
        specials = tuple(i for i in (pre.bos_id, pre.pad_id, pre.eos_id, unk) if i is not None)
        tokens = TokenMasking(pre.mask_id, self.enc_cfg.vocab_size, specials, float(options["mask_prob"]),
                              float(options["leave_unmasked_prob"]), float(options["random_token_prob"]),
                              int(options["mask_span"]))
        return BatchMasker(modality, options, text=tokens)

    # ------------------------------------------------------------------------------------------------ stepping

    def batches(self) -> Any:
        if self._batches is None:
            start = self.step * self.cfg["accum"]
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
        accum = cfg["accum"]
        lr = learning_rate(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.model.train()
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)
        items = 0
        for micro in range(accum):
            np_batch = next(self.batches())
            rng = np.random.default_rng([cfg["seed"], _MASK_TAG, self.step, micro, d.rank])
            batch = self._to_device(self.masker(np_batch, rng))
            items += int(next(iter(np_batch.values())).shape[0])
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
        clip = float(cfg["clip_grad"])
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        decay = ema_decay(self.step, float(cfg["ema_decay"]), float(cfg["ema_end_decay"]),
                          int(cfg["ema_anneal_steps"]))
        self.objective.update_teacher(decay)
        totals[:3] /= accum
        totals = distributed.all_reduce_mean(torch.cat([totals, grad_norm.detach().double().reshape(1)]), d)
        loss, tvar, pvar, masked, gnorm = totals.tolist()
        self.samples += items * d.world_size
        return {"step": self.step, "loss": loss, "lr": lr, "ema_decay": decay, "target_var": tvar,
                "pred_var": pvar, "masked": masked, "grad_norm": gnorm, "samples": self.samples}

    def check_collapse(self, m: dict[str, float]) -> None:
        g = self.cfg["guard"]
        if self.step <= int(g["after"]):
            return
        for name, key in (("target_var", "min_target_var"), ("pred_var", "min_pred_var")):
            if not m[name] >= float(g[key]):  # NaN fails too
                raise CollapseError(f"collapse guard: {name} {m[name]:.4g} fell below {key}={g[key]} at step "
                                    f"{self.step} (guard active after {g['after']} updates)")

    # ------------------------------------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        cfg, d = self.cfg, self.dist
        total = int(cfg["steps"])
        stop = min(total, int(cfg["stop_at"])) if cfg.get("stop_at") else total
        log = self._open_log()
        bar = None
        if d.is_main and cfg["progress"]:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=self.step, desc=f"d2v-train {cfg['modality']}", dynamic_ncols=True,
                       file=sys.stderr)
        start, start_samples = time.perf_counter(), self.samples
        metrics: dict[str, Any] = {}
        try:
            while self.step < stop:
                metrics = self.train_step()
                elapsed = time.perf_counter() - start
                metrics["elapsed_s"] = round(elapsed, 3)
                metrics["samples_per_s"] = round((self.samples - start_samples) / max(elapsed, 1e-9), 2)
                if log is not None and (self.step % cfg["log_every"] == 0 or self.step == stop):
                    log.write(json.dumps(metrics) + "\n")
                    log.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                    ema=f"{metrics['ema_decay']:.5f}", tvar=f"{metrics['target_var']:.3f}")
                self.check_collapse(metrics)
                if self.step % cfg["save_every"] == 0 or self.step == stop:
                    self.save(metrics)
            if self.step == 0:  # --steps 0: the initial weights, a baseline for d2v-eval
                self.save(metrics)
        finally:
            if bar is not None:
                bar.close()
            if log is not None:
                log.close()
            self.close()
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
            "scheduler": {"name": cfg["schedule"], "step": self.step, "lr": learning_rate(self.step, cfg)},
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "objective": cfg.get("objective", "data2vec"),
            **_cpu(self.objective.training_state()),  # teacher, and head (data2vec) or decoder (data2vec2)
            "ema": {"decay": metrics.get("ema_decay"), "updates": self.step, "start": cfg["ema_decay"],
                    "end": cfg["ema_end_decay"], "anneal_steps": cfg["ema_anneal_steps"]},
            "rng": {"torch": [r["torch"] for r in rng], "cuda": [r["cuda"] for r in rng]},
            "data": {"micro_step": self.step * cfg["accum"], "world_size": d.world_size, "seed": cfg["seed"],
                     "batch_size": cfg["batch_size"]},
            "world_size": d.world_size,
            # wall-clock figures stay in metrics.jsonl, so that the same run gives a byte-identical checkpoint
            "metrics": {k: v for k, v in metrics.items()
                        if isinstance(v, int | float) and k not in ("elapsed_s", "samples_per_s")},
            "config": cfg,
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
        seed = int(np.random.SeedSequence([self.cfg["seed"], _TORCH_TAG, d.rank, self.step]).generate_state(1)[0])
        torch.manual_seed(seed)


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
