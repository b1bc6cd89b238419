"""The training config: one defaults table per modality, and how a run's config is resolved from it.

A config is a nested dict of JSON values. Resolution order (later wins): `COMMON`, the modality's table in
`MODALITY`, a `--config` file (JSON or YAML, nested like the table), explicit command-line flags, then each
`--set key.path=value` in order. Keys are checked against the table, so a typo fails with the list of known keys.
The resolved config is stored whole in the checkpoint (`ckpt["training"]["config"]`).

Every number comes from the data2vec reference setups (fairseq / data2vec_vision), see reference/data2vec.md.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
from pathlib import Path
from typing import Any

COMMON: dict[str, Any] = {
    "modality": None,
    "objective": "data2vec",  # data2vec | data2vec2 (encode the visible positions only, conv decoder, M masks)
    "recipe": None,  # None | a RECIPES name: overrides for a kind of run, on top of the objective's defaults
    "preset": "tiny",
    "steps": None,  # optimizer updates
    "out": None,
    "init": None,  # a d2v checkpoint (e.g. d2v-import-hf output) to continue pretraining from
    "seed": 1,
    "init_std": 0.02,  # std of the normal init of linear and embedding weights (fresh runs)
    "device": "auto",  # auto | cpu | cuda
    "precision": "auto",  # auto (cuda: bf16 if supported else fp16; cpu: fp32) | fp32 | bf16 | fp16
    "cpu_bf16": False,  # let precision=auto use bf16 autocast on CPU
    "batch_size": 8,  # items per rank per micro-batch
    "accum": 1,  # micro-batches per optimizer update
    "lr": 5e-4,
    "betas": [0.9, 0.98],
    "eps": 1e-6,
    "weight_decay": 0.01,
    "clip_grad": 0.0,  # max global grad norm; 0 = no clipping
    "schedule": "cosine",  # cosine | tri_stage | constant
    "warmup_frac": 0.01,  # cosine warmup as a fraction of steps ...
    "warmup_steps": None,  # ... or as a number of updates (wins when set)
    "min_lr_ratio": 0.0,  # cosine floor as a fraction of lr
    "tri_stage": [0.03, 0.90, 0.07],  # warmup / hold / decay fractions of steps
    "init_lr_scale": 0.01,
    "final_lr_scale": 0.01,
    "ema_decay": 0.999,  # tau_0
    "ema_end_decay": 0.9999,  # tau_e
    "ema_anneal_steps": 30000,  # T
    "loss_beta": 0.0,  # 0: L2; > 0: smooth L1 with this beta
    "loss_scale": None,  # None: 1 / sqrt(hidden_size)
    "loss_reduce": "sum",  # over dims per masked position: sum | mean
    "head_layers": 1,  # 1: Linear(D, D); 2: Linear(D, 2D) -> GELU -> Linear(2D, D)
    # what the head reads for a masked position: "position" (data2vec: the student's output there) or "document"
    # (the mean of the student's outputs at the item's visible positions: the short text recipe; data2vec2's decoder
    # then reads that mean as a one-position sequence)
    "head_input": "position",
    "embed_lr_scale": 1.0,  # text: the token embeddings step at this multiple of the scheduled lr
    "target_layers_of_12": None,  # top-K target layers per 12, scaled to the depth; None: the modality's data2vec K
    "teacher": {
        "drop": [],  # student parts the teacher leaves out
        "copy": [],  # student parameters the teacher shares (copied after every step, not averaged)
        "reads_student_features": False,  # True: teacher encodes the student's front-end features
        "mask_param": None,  # student parameter written into masked front-end positions
    },
    # collapse guard (fairseq's thresholds); after None: min(5000, max(100, 10 % of steps)): short runs are guarded too
    "guard": {"min_target_var": 0.1, "min_pred_var": 0.01, "after": None},
    "save_every": 1000,
    "log_every": 1,
    "stop_at": None,  # end this invocation (with a checkpoint) after this update; --resume continues to `steps`
    "progress": True,  # tqdm progress bar on rank 0
    "masking": {},
    "decoder": {},  # data2vec2 only
    "cls_loss": 0.0,  # data2vec2: weight of the CLS output regressing the mean patch target (image)
    "data": {
        "path": None,
        "num_workers": 2,  # decoding threads
        "prefetch": 2,
        "bucket_batches": 50,  # similar-length batching window (batches)
        "max_batch_cost": None,  # padded samples / tokens per batch; None = batch_size only
    },
    "model": {},  # EncoderConfig overrides on top of the preset (or the --init checkpoint's config)
}

MODALITY: dict[str, dict[str, Any]] = {
    # fairseq data2vec audio base (LibriSpeech): Adam(0.9, 0.98) eps 1e-6 wd 0.01, lr 5e-4, tri-stage 3/90/7.
    "audio": {
        "batch_size": 8,
        "lr": 5e-4,
        "schedule": "tri_stage",
        "ema_decay": 0.999, "ema_end_decay": 0.9999, "ema_anneal_steps": 30000,
        "loss_beta": 0.0, "loss_scale": None, "loss_reduce": "sum", "head_layers": 1,
        "teacher": {"drop": ["feature_extractor", "feature_projection", "mask_embedding"], "copy": ["pos_conv"],
                    "reads_student_features": True, "mask_param": "mask_embedding"},
        "masking": {"mask_prob": 0.65, "mask_length": 10, "min_masks": 2, "require_same_masks": True},
        "data": {"max_samples": 250000, "min_samples": 0, "pad_audio": False},
    },
    # data2vec_vision (BEiT): AdamW(0.9, 0.999) wd 0.05, lr 2e-3 (at batch 2048), 10 of 800 epochs warmup,
    # cosine, clip 3, drop path 0.25, layer scale 1e-4, constant EMA 0.9998, smooth L1 beta 2 (mean).
    "image": {
        "batch_size": 32,
        "lr": 2e-3,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "weight_decay": 0.05,
        "clip_grad": 3.0,
        "schedule": "cosine", "warmup_frac": 0.0125, "min_lr_ratio": 0.005,
        "ema_decay": 0.9998, "ema_end_decay": 0.9998, "ema_anneal_steps": 0,
        "loss_beta": 2.0, "loss_scale": 1.0, "loss_reduce": "mean", "head_layers": 1,
        "teacher": {"drop": [], "copy": [], "reads_student_features": False, "mask_param": "mask_token"},
        # BEiT: 120 of 196 patches in blocks of >= 16; None scales 120/196 to the preset's grid
        "masking": {"num_mask_patches": None, "min_block_patches": 16, "max_block_patches": None,
                    "min_aspect": 0.3, "max_aspect": None},
        "data": {"augment": True, "crop_scale": [0.08, 1.0], "crop_ratio": [0.75, 1.3333333333333333],
                 "hflip": 0.5},
        "model": {"drop_path": 0.25, "layer_scale_init": 1e-4},
    },
    # fairseq data2vec text base: Adam(0.9, 0.98) eps 1e-6 wd 0.01, lr 2e-4, cosine, 10k of 1M warmup, clip 5,
    # EMA 0.999 -> 0.9999 over 300k, smooth L1 beta 4 scale 1, two-layer head, 15% BERT masking.
    "text": {
        "batch_size": 32,
        "lr": 2e-4,
        "clip_grad": 5.0,
        "schedule": "cosine", "warmup_frac": 0.01,
        "ema_decay": 0.999, "ema_end_decay": 0.9999, "ema_anneal_steps": 300000,
        "loss_beta": 4.0, "loss_scale": 1.0, "loss_reduce": "sum", "head_layers": 2,
        "teacher": {"drop": [], "copy": ["token_embed", "position_embed", "token_type_embed", "embed_norm"],
                    "reads_student_features": False, "mask_param": None},
        "masking": {"mask_prob": 0.15, "leave_unmasked_prob": 0.1, "random_token_prob": 0.1, "mask_span": 1},
        # vocab_size None: the preset's vocabulary size; text_max_length None: the model's positions - 2
        "data": {"vocab_size": None, "text_max_length": None, "min_frequency": 2, "text_mode": "chunk"},
    },
}

# data2vec 2.0 (fairseq examples/data2vec/config/v2/base_*_only_task.yaml), applied on top of the modality's table
# with `--objective data2vec2`; `masking` and `decoder` replace the data2vec sections whole. The decoder width scales
# with the model: decoder.dim None = the reference width x hidden / 768 (audio 384, image and text 768 at base).
OBJECTIVES: dict[str, dict[str, dict[str, Any]]] = {
    "data2vec": {"audio": {}, "image": {}, "text": {}},
    "data2vec2": {
        "audio": {
            # batch 2 x 8 masks (before: 4 x 4; reference M 8): 8 seeds side by side with data2vec (docs/benchmarks.md,
            # "Side by side, 2026-12-03 07:27-08:15"): the front end runs once per item and is the largest part of a
            # `tiny` update (41 % at 4 x 4), so half the items with twice the masks costs 0.84x the CPU per update
            # and learns faster early (mean probe 0.759 after 100 updates against 0.696). Over 1200 updates: 4.2x /
            # 3.9x / 3.9x / 5.3x / 5.3x less CPU than data2vec to 0.80 / 0.85 / 0.88 / 0.90 / 0.91 and 3.6x to
            # data2vec's final 0.923, ending 0.931; over 800 it stops at 0.905 (the cosine schedule ends before the
            # probe has climbed).
            "batch_size": 2,
            # lr, decoder kernel and input_dropout, layerdrop: the reference's 7.5e-4, 7, 0.1, 0.05 learn slower in a
            # short `tiny` run (4 layers). tiny, seed 1, 800 updates (docs/quality.md, "data2vec 2.0"): the reference
            # values 0.906 after 400 updates (54 CPU s); no dropouts 0.923 after 600 (86 s); no dropouts + kernel 5
            # + lr 1e-3 0.919 after 300 (40 s), 0.940 after 400 (that seed's luck: 8 seeds, below, are the figure).
            # Seed 2: 0.906 after 400 (reference values: 0.855 at best). `--set lr=7.5e-4 --set decoder.kernel=7
            # --set decoder.layers=4 ...` is the reference (README).
            # decoder.layers 2 (reference 4): the less the decoder can do, the more the encoder's last layer holds.
            # Over 8 seeds (800 updates, docs/benchmarks.md) the mean probe is 0.713 / 0.816 / 0.876 / 0.895 / 0.901
            # after 100 / 200 / 300 / 600 / 800 updates with 2 layers, 0.641 / 0.773 / 0.849 / 0.886 / 0.893 with 4.
            # lr 1.5e-3 and ema_decay 0.9999 (reference 7.5e-4 and 0.999): 8 seeds side by side (docs/benchmarks.md,
            # "Audio: 8 seeds"), the mean probe 0.715 / 0.811 / 0.850 / 0.894 / 0.912 / 0.916 after 100 / 200 / 300
            # / 400 / 600 / 800 updates, against 0.711 / 0.794 / 0.857 / 0.884 / 0.893 / 0.903 with lr 1e-3 and
            # 0.999: a teacher that stays near its initial weights, as the short text recipe found. The same teacher
            # lifts data2vec too (docs/benchmarks.md), so this is a short-run default, not an objective's advantage.
            # clip_grad 2.0 (reference: none): 8 seeds side by side with data2vec (docs/benchmarks.md, "Audio: 8
            # seeds"), the mean probe 0.696 / 0.859 / 0.873 / 0.892 / 0.910 / 0.920 at the same updates, 2.89x /
            # 2.95x / 2.88x less CPU than data2vec to 0.80 / 0.85 / 0.88 where no clipping gives 2.5x / 1.9x / 2.6x.
            "lr": 1.5e-3, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.01, "clip_grad": 2.0,
            "schedule": "cosine", "warmup_frac": 0.02,
            "ema_decay": 0.9999, "ema_end_decay": 0.99999, "ema_anneal_steps": 75000,
            "loss_beta": 0.0, "loss_scale": None, "loss_reduce": "sum", "head_layers": 1, "cls_loss": 0.0,
            "target_layers_of_12": 8,
            "teacher": {"drop": ["feature_extractor", "feature_projection", "mask_embedding"], "copy": [],
                        "reads_student_features": True, "mask_param": "mask_embedding"},
            # num_masks 8 with batch 2 (above). At batch 4, M 4 cost 0.71x the CPU of M 8 and reached each accuracy
            # sooner (8 seeds, docs/benchmarks.md, "Audio: 8 seeds"); M 2 ended under 0.90.
            "masking": {"mask_prob": 0.5, "mask_length": 5, "num_masks": 8},
            "decoder": {"dim": None, "kernel": 5, "groups": 16, "layers": 2, "residual": True,
                        "input_dropout": 0.0, "mask_noise_std": 0.01},
            "model": {"layerdrop": 0.0, "target_source": "ffn", "target_norm": "instance",
                      "target_final_norm": False},
        },
        "image": {
            "batch_size": 16,
            "lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.05, "clip_grad": 4.0,
            "schedule": "cosine", "warmup_frac": 0.1333, "min_lr_ratio": 0.0,
            "ema_decay": 0.9998, "ema_end_decay": 0.99999, "ema_anneal_steps": 100000,
            # cls_loss: the reference's 0.01 (x the CLS regression summed over the B x M rows, as fairseq) dominates
            # a short `tiny` run's loss and costs probe accuracy: tiny, seed 1, 600 updates at M 4, 0.710 with 0.01,
            # 0.794 with 0.01/64 (a mean over the rows), 0.816 without (docs/quality.md, "data2vec 2.0"). 0 here;
            # `--set cls_loss=0.01` is the reference.
            "loss_beta": 0.0, "loss_scale": None, "loss_reduce": "sum", "head_layers": 1, "cls_loss": 0.0,
            "target_layers_of_12": 10,
            "teacher": {"drop": [], "copy": [], "reads_student_features": False, "mask_param": "mask_token"},
            # inverse block masking: 39 of 196 patches kept (in 3x3 blocks); None scales 39/196 to the grid.
            # num_masks: the reference's 16; in the same short `tiny` runs (600 updates, cls_loss 0) M 4 gets the
            # most probe accuracy per CPU second: at the end M 2 0.756 (39 CPU s), M 4 0.816 (61 s), M 8 0.804
            # (100 s); M 16 ran 0.41 CPU s per update (M 4: 0.10) for 0.734 after 300 updates.
            "masking": {"keep_patches": None, "keep_block": 3, "num_masks": 4},
            "decoder": {"dim": None, "kernel": 3, "groups": 16, "layers": 6, "residual": True,
                        "input_dropout": 0.0, "mask_noise_std": 0.01},
            "model": {"drop_path": 0.0, "target_source": "ffn", "target_norm": "instance",
                      "target_final_norm": True},
        },
        "text": {
            "batch_size": 8,
            "lr": 2e-4, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.01, "clip_grad": 1.0,
            "schedule": "cosine", "warmup_frac": 0.01,
            "ema_decay": 0.9999, "ema_end_decay": 0.99999, "ema_anneal_steps": 100000,
            "loss_beta": 0.0, "loss_scale": 1.0, "loss_reduce": "sum", "head_layers": 2, "cls_loss": 0.0,
            "target_layers_of_12": 12,
            "teacher": {"drop": [], "copy": ["token_embed", "position_embed", "token_type_embed", "embed_norm"],
                        "reads_student_features": False, "mask_param": None},
            "masking": {"mask_prob": 0.48, "mask_length": 1, "num_masks": 8},
            "decoder": {"dim": None, "kernel": 9, "groups": 1, "layers": 5, "residual": False,
                        "input_dropout": 0.1, "mask_noise_std": 0.01},
            "model": {"target_source": "ffn", "target_norm": "instance", "target_final_norm": False},
        },
    },
}
# Recipes: overrides for a kind of run, applied on top of the modality's (and objective's) defaults.
# "short": a few thousand updates of a small model on a small corpus (docs/quality.md). Image and audio defaults
# learn in such runs as they are. Text needs three changes together (each alone, or any two, does not help):
# - a teacher that stays near its initial weights, with token embeddings of its own: EMA 0.99999 throughout
#   (data2vec 2.0's final decay), so the targets are fixed codes of the tokens in context; a teacher sharing the
#   student's embeddings moves every target with them;
# - every masked target predicted from the mean of the item's visible outputs (what a mean-pooled probe reads),
#   not from the position's own output, which learns the sentence's syntax first;
# - token embeddings stepped at 15x the lr: words that share contexts must move together from the 0.02 init.
# Half the tokens masked (data2vec's 15 % gives a document one to four targets an update) adds 8-12 points more.
# Targets layer-normed per token (data2vec's text choice; data2vec 2.0's instance norm centres every channel over the
# document, which leaves a document-level prediction nothing to predict): with --objective data2vec2 the recipe then
# gains 8-12 probe points in a short run (3 seeds) instead of losing 2 (docs/quality.md).
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "short": {
        "audio": {},
        "image": {},
        "text": {"head_input": "document", "embed_lr_scale": 15.0, "ema_decay": 0.99999, "ema_end_decay": 0.99999,
                 "teacher": {"copy": []}, "masking": {"mask_prob": 0.5}, "model": {"target_norm": "layer"}},
    },
}

# What a recipe changes for one objective only, on top of RECIPES. data2vec2's text decoder (5 conv layers) has one
# position to read under the document head, so it is only a deeper MLP between the pooled output and the targets:
# tiny, seed 1, 1000 updates, the probe 0.514 with 5 layers, 0.614 with 1, 0.632 with none (the projection only);
# without it, 2 masks of 32 documents per update 0.680 (1 of 32: 0.645, 2 of 16: 0.603; docs/quality.md, "Sixth
# round"). 4 masks of 32 then beat 2 at equal CPU time over 3 seeds: 0.680 after 2000 updates against 0.664 after
# 3000 (189 and 182 CPU s), where data2vec with the recipe has 0.672 (docs/benchmarks.md, "Text").
RECIPE_OBJECTIVES: dict[str, dict[str, dict[str, dict[str, Any]]]] = {
    "short": {"data2vec2": {"text": {"batch_size": 32, "masking": {"num_masks": 4}, "decoder": {"layers": 0}}}},
}

HEAD_INPUTS = ("position", "document")  # Data2Vec.head_inputs
DECODER_WIDTH_AT_768 = {"audio": 384, "image": 768, "text": 768}
INVERSE_KEEP_FRACTION = 39 / 196

BEIT_MASK_FRACTION = 120 / 196
GUARD_MIN_AFTER = 100


class ConfigError(ValueError):
    """A config key or value that cannot be used (one-line message)."""


def defaults(modality: str, objective: str = "data2vec", recipe: str | None = None) -> dict[str, Any]:
    if modality not in MODALITY:
        raise ConfigError(f"unknown modality {modality!r}; expected one of {', '.join(MODALITY)}")
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
    cfg = merge(copy.deepcopy(COMMON), MODALITY[modality], strict=False)
    table = copy.deepcopy(OBJECTIVES[objective][modality])
    for section in ("masking", "decoder"):
        if section in table:
            cfg[section] = table.pop(section)
    merge(cfg, table, strict=False)
    if recipe is not None:
        if recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {recipe!r}; expected one of {', '.join(RECIPES)}")
        merge(cfg, copy.deepcopy(RECIPES[recipe][modality]))
        merge(cfg, copy.deepcopy(RECIPE_OBJECTIVES.get(recipe, {}).get(objective, {}).get(modality, {})))
    cfg["modality"], cfg["objective"], cfg["recipe"] = modality, objective, recipe
    return cfg


def merge(base: dict[str, Any], update: dict[str, Any], strict: bool = True, where: str = "") -> dict[str, Any]:
    """Recursive merge of `update` into `base` (in place). With strict, keys must already exist in `base`, except
    under the free-form sections `model` (checked by EncoderConfig)."""
    for key, value in update.items():
        path = f"{where}{key}"
        if strict and key not in base and where not in ("model.",):
            raise ConfigError(f"unknown config key {path!r}{_suggest(key, base)}")
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value, strict, f"{path}.")
        else:
            base[key] = _coerce(path, base.get(key), value)
    return base


def set_path(cfg: dict[str, Any], assignment: str) -> None:
    """Apply one `key.path=value`; the value is JSON when it parses as JSON (numbers, true, null, [..]), else a
    plain string."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    *parents, leaf = key.strip().split(".")
    update: dict[str, Any] = {leaf: value}
    for parent in reversed(parents):
        update = {parent: update}
    merge(cfg, update)


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: reading YAML needs pyyaml (pip install pyyaml), or use JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({' '.join(str(e).split())})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file holds one mapping of keys to values")
    return data


def resolve_derived(cfg: dict[str, Any], hidden_size: int, num_patches: int | None) -> dict[str, Any]:
    """Fill the values left as None that depend on the model or the run: loss scale, image mask count, guard start."""
    if cfg["guard"]["after"] is None:
        cfg["guard"]["after"] = guard_after(int(cfg["steps"]))
    if cfg["loss_scale"] is None:
        cfg["loss_scale"] = 1.0 / math.sqrt(hidden_size)
    masking = cfg["masking"]
    if cfg["modality"] == "image" and "num_mask_patches" in masking and masking["num_mask_patches"] is None:
        masking["num_mask_patches"] = round(BEIT_MASK_FRACTION * num_patches)
    if cfg["modality"] == "image" and "keep_patches" in masking and masking["keep_patches"] is None:
        masking["keep_patches"] = max(1, round(INVERSE_KEEP_FRACTION * num_patches))
    decoder = cfg["decoder"]
    if "dim" in decoder and decoder["dim"] is None:
        decoder["dim"] = max(1, round(DECODER_WIDTH_AT_768[cfg["modality"]] * hidden_size / 768))
    return cfg


def guard_after(steps: int) -> int:
    """Updates before the collapse guard starts: fairseq's 5000, or 10 % of a shorter run but at least 100 (in the
    first updates a small model's predictions are still near zero: pred_var < 0.01 there is no collapse)."""
    return min(5000, max(GUARD_MIN_AFTER, steps // 10))


def check(cfg: dict[str, Any]) -> None:
    """Values that must hold before a run starts."""
    for key in ("steps", "batch_size", "accum", "save_every", "log_every"):
        value, least = cfg[key], 0 if key == "steps" else 1  # steps 0: write the initial weights
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            kind = "a non-negative" if least == 0 else "a positive"
            raise ConfigError(f"{key} must be {kind} integer, got {value!r}")
    if not cfg["data"]["path"]:
        raise ConfigError("no training data: pass --data PATH")
    if cfg["precision"] not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"precision must be auto, fp32, bf16 or fp16, got {cfg['precision']!r}")
    if cfg["device"] not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {cfg['device']!r}")
    if cfg.get("objective", "data2vec") not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {cfg['objective']!r}")
    if not (isinstance(cfg["lr"], int | float) and cfg["lr"] > 0):
        raise ConfigError(f"lr must be a positive number, got {cfg['lr']!r}")
    if cfg["head_input"] not in HEAD_INPUTS:
        raise ConfigError(f"head_input must be 'position' or 'document', got {cfg['head_input']!r}")
    layers = cfg["decoder"].get("layers")
    if cfg.get("objective") == "data2vec2" and (not isinstance(layers, int) or isinstance(layers, bool) or layers < 0):
        raise ConfigError(f"decoder.layers must be a non-negative integer, got {layers!r}")
    if layers == 0 and cfg["head_input"] != "document":
        raise ConfigError("decoder.layers 0 needs head_input=document: without conv layers a masked position "
                          "would be predicted from its noise alone")
    if not cfg["embed_lr_scale"] > 0:
        raise ConfigError(f"embed_lr_scale must be a positive number, got {cfg['embed_lr_scale']!r}")
    if cfg["embed_lr_scale"] != 1.0 and cfg["modality"] != "text":
        raise ConfigError("embed_lr_scale scales the token embeddings' lr: text models only")


def _coerce(path: str, default: Any, value: Any) -> Any:
    """Keep the table's types: an int where a float is expected becomes a float, 2.0 where an int is expected
    becomes 2; anything else of the wrong kind is an error."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    elif isinstance(default, int) and isinstance(value, int | float) and not isinstance(value, bool):
        if float(value).is_integer():
            return int(value)
    elif isinstance(default, list) and isinstance(value, list | tuple):
        return list(value)
    elif isinstance(default, dict) and isinstance(value, dict):
        return value
    elif isinstance(default, str) and isinstance(value, str):
        return value
    raise ConfigError(f"config key {path!r} expects {type(default).__name__}, got {value!r}")


def _suggest(key: str, known: dict[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; known keys here: {', '.join(sorted(known))}"
