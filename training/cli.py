"""d2v-train: pretrain a data2vec encoder on a folder (or manifest) of audio, images or text.

    d2v-train --modality audio --data wavs/ --preset tiny --steps 2000 --out runs/a
    d2v-train --modality text --data corpus.txt --preset small --steps 50000 --out runs/t --set masking.mask_span=4
    d2v-train --out runs/a --resume                      # continue DIR/ckpt.pt exactly where it stopped
    torchrun --nproc_per_node 8 -m d2v.training.cli ...      # DDP (see the README)

Defaults come from training/defaults.py; `--config FILE` (JSON/YAML), the flags below and `--set key=value` override
them in that order. `--print-config` shows the resolved config and exits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from d2v_serve.console import add_version
from d2v_serve.preprocess import PreprocessError

from . import distributed
from .checkpoint import CheckpointError, load_checkpoint
from .data_sources import DataError
from .defaults import MODALITY, OBJECTIVES, RECIPES, ConfigError, check, defaults, load_config_file, merge, set_path
from .models import PRESETS
from .trainer import CKPT_NAME, CollapseError, Trainer

# flag -> config key path
FLAGS = {"preset": "preset", "steps": "steps", "data": "data.path", "init": "init", "seed": "seed",
         "device": "device", "precision": "precision", "batch_size": "batch_size", "lr": "lr", "accum": "accum",
         "save_every": "save_every", "log_every": "log_every", "objective": "objective", "recipe": "recipe"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="d2v-train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[2:]))
    p.add_argument("--modality", choices=sorted(MODALITY), help="required unless resuming")
    p.add_argument("--data", help="directory, manifest (paths or JSONL) or file")
    p.add_argument("--preset", choices=[n for n in PRESETS if n != "large"], help="model size (default tiny)")
    p.add_argument("--steps", type=int, help="optimizer updates in the whole run")
    p.add_argument("--out", required=True, help="run directory: ckpt.pt and metrics.jsonl")
    p.add_argument("--resume", action="store_true", help="continue DIR/ckpt.pt if it exists (else start fresh)")
    p.add_argument("--init", help="start from this d2v checkpoint (e.g. d2v-import-hf output)")
    p.add_argument("--objective", choices=sorted(OBJECTIVES),
                   help="data2vec (default) or data2vec2: encode visible positions only, conv decoder, M masks")
    p.add_argument("--recipe", choices=sorted(RECIPES),
                   help="run-kind overrides: short = a few thousand updates of a small model (docs/quality.md)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int, help="items per GPU/process per micro-batch")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--accum", type=int, help="micro-batches per update (gradient accumulation)")
    p.add_argument("--save-every", type=int, help="checkpoint every N updates (and at the end)")
    p.add_argument("--log-every", type=int, help="metrics.jsonl line every N updates")
    p.add_argument("--config", help="JSON or YAML file with config overrides")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set masking.mask_prob=0.5 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    add_version(p)
    return p


def resolve(args: argparse.Namespace, resume: dict[str, Any] | None) -> dict[str, Any]:
    """The run's config: the checkpoint's (resume) or the modality table, then file, flags and --set."""
    if resume is not None:
        cfg = resume["training"]["config"]
        if args.modality and args.modality != cfg["modality"]:
            raise ConfigError(f"{args.out} holds a {cfg['modality']} run; --modality {args.modality} does not match")
        cfg["stop_at"] = None  # an invocation setting, not part of the run
        for key, value in (("objective", "data2vec"), ("recipe", None), ("head_input", "position"),
                           ("embed_lr_scale", 1.0)):
            cfg.setdefault(key, value)  # checkpoints from before these keys
        objective, recipe = cfg["objective"], cfg["recipe"]
    elif not args.modality:
        raise ConfigError("--modality is required when starting a run")
    else:
        objective, recipe = requested(args, "objective", "data2vec"), requested(args, "recipe", None)
        cfg = defaults(args.modality, objective, recipe)
    apply_overrides(cfg, args)
    if cfg["objective"] != objective:
        raise ConfigError(f"objective {cfg['objective']!r} cannot change in a resumed run (it is {objective!r})")
    if cfg["recipe"] != recipe:
        raise ConfigError(f"recipe {cfg['recipe']!r} cannot change in a resumed run (it is {recipe!r})")
    cfg["out"] = str(args.out)
    if args.no_progress:
        cfg["progress"] = False
    check(cfg)
    return cfg


def requested(args: argparse.Namespace, key: str, default: str | None) -> str | None:
    """The objective (or recipe) chosen by the config file, the flag or --set KEY=..., later winning: it picks the
    defaults the rest of the overrides apply to."""
    probe: dict[str, Any] = {key: default}
    if args.config:
        probe[key] = load_config_file(args.config).get(key, probe[key])
    if getattr(args, key):
        probe[key] = getattr(args, key)
    for assignment in args.set:
        if assignment.partition("=")[0].strip() == key:
            set_path(probe, assignment)
    return None if probe[key] is None else str(probe[key])


def apply_overrides(cfg: dict[str, Any], args: argparse.Namespace) -> None:
    if args.config:
        merge(cfg, load_config_file(args.config))
    for flag, key in FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            set_path(cfg, f"{key}={json.dumps(value)}")
    for assignment in args.set:
        set_path(cfg, assignment)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    d = None
    code = 0
    try:
        ckpt_path = Path(args.out) / CKPT_NAME
        resume = load_checkpoint(ckpt_path) if args.resume and ckpt_path.exists() else None
        if resume is not None and "training" not in resume:
            raise CheckpointError(f"{ckpt_path}: has no training state to resume from")
        cfg = resolve(args, resume)
        if args.print_config:
            print(json.dumps(cfg, indent=2))
            return 0
        if resume is None and ckpt_path.exists():
            raise ConfigError(f"{ckpt_path} exists; pass --resume to continue that run, or choose another --out")
        init = load_checkpoint(cfg["init"]) if cfg.get("init") and resume is None else None
        d = distributed.setup(cfg["device"])
        Trainer(cfg, resume=resume, init=init, dist=d).run()
    except CollapseError as e:
        code = _fail(str(e), 3, d)
    except (ConfigError, CheckpointError) as e:
        code = _fail(str(e), 2, d)
    except (DataError, PreprocessError, ValueError, OSError) as e:  # config values, data, files: one line
        code = _fail(" ".join(str(e).split()) or type(e).__name__, 1, d)
    except KeyboardInterrupt:
        code = _fail("interrupted; the last checkpoint is intact (resume with --resume)", 130, d)
    if d is not None:
        distributed.finish(d, code)
    return code


def _fail(message: str, code: int, d: distributed.Dist | None) -> int:
    prefix = f"[rank {d.rank}] " if d is not None and d.enabled else ""
    print(f"d2v-train: error: {prefix}{message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
