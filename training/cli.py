"""d2v-train: pretrain a data2vec encoder on a folder (or manifest) of audio, images or text.

    d2v-train --modality audio --data wavs/ --preset tiny --steps 2000 --out runs/a
    d2v-train --modality text --data corpus.txt --preset small --steps 50000 --out runs/t --set masking.mask_span=4
    d2v-train --out runs/a --resume                      # continue DIR/ckpt.pt exactly where it stopped
    torchrun --nproc_per_node 8 -m d2v.training.cli ...      # DDP (docs/training.md)

Defaults are the published reference recipes (training/objectives/, docs/objectives.md); `--recipe short` tunes them
for a few thousand updates of a small model (docs/research.md); `--config FILE` (JSON/YAML), the command-line flags and
`--set key.path=value` override them in that order. `--print-config` prints the resolved config as JSON and exits
(no --data or --out needed).
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
from .config import (
    CONFIG_VERSION,
    ConfigError,
    TrainConfig,
    check,
    from_dict,
    load_config_file,
    merge,
    recipe_names,
    recipe_warnings,
    reference_dict,
    resolve_config,
    set_assignment,
)
from .data_sources import DataError
from .models import PRESETS
from .objectives import OBJECTIVES
from .trainer import CKPT_NAME, CollapseError, Trainer

# flag -> config key path
FLAGS = {"preset": "preset", "steps": "steps", "data": "data.path", "init": "init", "seed": "seed",
         "device": "device", "precision": "precision", "batch_size": "batch_size", "lr": "lr", "accum": "accum",
         "save_every": "save_every", "log_every": "log_every", "objective": "objective", "recipe": "recipe"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="d2v-train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[2:]))
    p.add_argument("--modality", choices=["audio", "image", "text"], help="required unless resuming")
    p.add_argument("--data", help="directory, manifest (paths or JSONL) or file")
    p.add_argument("--preset", choices=[n for n in PRESETS if n != "large"], help="model size (default tiny)")
    p.add_argument("--steps", type=int, help="optimizer updates in the whole run (default: the reference's)")
    p.add_argument("--out", help="run directory: ckpt.pt and metrics.jsonl (required unless --print-config)")
    p.add_argument("--resume", action="store_true", help="continue DIR/ckpt.pt if it exists (else start fresh)")
    p.add_argument("--init", help="start from this d2v checkpoint (e.g. d2v-import-hf output)")
    p.add_argument("--objective", choices=sorted(OBJECTIVES),
                   help="data2vec (default) or data2vec2: encode visible positions only, conv decoder, M masks")
    p.add_argument("--recipe", choices=recipe_names(),
                   help="run-kind overrides: short = a few thousand updates of tiny/small (docs/research.md); "
                        "without it the reference defaults (docs/objectives.md)")
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


def resolve(args: argparse.Namespace, resume: dict[str, Any] | None) -> TrainConfig:
    """The run's config: the checkpoint's (resume) or the objective's defaults and recipe, then file, flags, --set."""
    layers = override_layers(args)
    if resume is not None:
        saved = saved_config(resume, args)
        if args.modality and args.modality != saved["modality"]:
            raise ConfigError(f"{args.out} holds a {saved['modality']} run; --modality {args.modality} does not match")
        saved["stop_at"] = None  # an invocation setting, not part of the run
        objective, recipe = saved["objective"], saved["recipe"]
        for key, value in (("objective", objective), ("recipe", recipe)):
            if requested(layers, key, value) != value:
                raise ConfigError(f"{key} {requested(layers, key, value)!r} cannot change in a resumed run (it is "
                                  f"{value!r})")
        cfg = from_dict(merge_layers(saved, layers))
    elif not args.modality:
        raise ConfigError("--modality is required when starting a run")
    else:
        objective, recipe = requested(layers, "objective", "data2vec"), requested(layers, "recipe", None)
        cfg = resolve_config(args.modality, objective, recipe, layers)
    cfg.out = str(args.out) if args.out else None
    if args.no_progress:
        cfg.progress = False
    return cfg


def saved_config(resume: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The config a checkpoint was trained with, as a nested dict; a checkpoint from before the typed config (flat
    keys) is translated onto the reference layout, or refused in one line."""
    training = resume["training"]
    saved = training.get("config")
    if not isinstance(saved, dict) or "modality" not in saved:
        raise CheckpointError(f"{args.out}: the checkpoint holds no training config to resume from")
    if training.get("config_version") == CONFIG_VERSION:
        return saved
    if training.get("config_version") is not None:
        raise CheckpointError(f"{args.out}: training config version {training['config_version']!r} is not one this "
                              f"d2v reads ({CONFIG_VERSION}); resume it with the d2v that wrote it")
    old = dict(saved)
    old.setdefault("objective", "data2vec")
    old.setdefault("recipe", None)
    if not old.get("decoder"):
        old.pop("decoder", None)
    try:
        return merge(reference_dict(old["modality"], old["objective"]), old)
    except ConfigError as e:
        raise CheckpointError(f"{args.out}: a checkpoint from an older d2v whose config cannot be read ({e})") from None


def override_layers(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The config file, the flags and each --set, in that order, as nested dicts."""
    layers = [load_config_file(args.config)] if args.config else []
    for flag, key in FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            layers.append(set_assignment(f"{key}={json.dumps(value)}"))
    layers += [set_assignment(a) for a in args.set]
    return layers


def merge_layers(cfg: dict[str, Any], layers: list[dict[str, Any]]) -> dict[str, Any]:
    for layer in layers:
        merge(cfg, layer)
    return cfg


def requested(layers: list[dict[str, Any]], key: str, default: str | None) -> str | None:
    """The objective (or recipe) chosen by the config file, the flag or --set KEY=..., later winning: it picks the
    defaults the rest of the overrides apply to."""
    value = default
    for layer in layers:
        if key in layer:
            value = layer[key]
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"config key {key!r} expects a name, got {value!r}")
    return value


def announce(cfg: TrainConfig) -> None:
    """One line naming the recipe a run resolved to, and a warning where it does not fit the run."""
    if cfg.recipe is None:
        what = f"reference defaults of {cfg.objective} {cfg.modality} (docs/objectives.md)"
    else:
        what = f"{cfg.recipe!r} for {cfg.objective} {cfg.modality} (docs/research.md)"
    print(f"d2v-train: recipe: {what}, preset {cfg.preset}, {cfg.steps} updates", file=sys.stderr)
    for note in recipe_warnings(cfg):
        print(f"d2v-train: warning: {note}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    d = None
    code = 0
    try:
        ckpt_path = Path(args.out) / CKPT_NAME if args.out else None
        resume = load_checkpoint(ckpt_path) if args.resume and ckpt_path and ckpt_path.exists() else None
        if resume is not None and "training" not in resume:
            raise CheckpointError(f"{ckpt_path}: has no training state to resume from")
        cfg = resolve(args, resume)
        if args.print_config:
            print(cfg.to_json())
            return 0
        if ckpt_path is None:
            raise ConfigError("no run directory: pass --out DIR")
        check(cfg, need_data=True)
        if resume is None and ckpt_path.exists():
            raise ConfigError(f"{ckpt_path} exists; pass --resume to continue that run, or choose another --out")
        init = load_checkpoint(cfg.init) if cfg.init and resume is None else None
        d = distributed.setup(cfg.device)
        trainer = Trainer(cfg, resume=resume, init=init, dist=d)
        if d.is_main:
            announce(cfg)  # once the data and the model are known to be usable
        trainer.run()
        if d.is_main:
            print(f"d2v-train: done at step {trainer.step}; checkpoint {ckpt_path} (export it: d2v-export {ckpt_path} "
                  "-o model.onnx)", file=sys.stderr)
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
