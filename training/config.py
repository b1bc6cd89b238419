"""The typed training config: `TrainConfig`, a few small dataclasses, resolved once.

Resolution order (later wins): the objective's reference defaults for the modality (training/objectives/, transcribed
in docs/objectives.md), a named recipe (`--recipe short`), a `--config` file (JSON or YAML, nested like the printed
config), the command-line flags, then each `--set key.path=value` in order. Every key and value is checked against
the dataclasses below, so a typo or a wrong type fails with one line. The resolved config is stored whole in the
checkpoint (`ckpt["training"]["config"]`, `config_version` 2); a checkpoint written before the typed config is
translated key by key (`LEGACY_KEYS`) or refused in one line.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_VERSION = 2
HEAD_INPUTS = ("position", "document")  # what the head reads for a masked position (objectives/data2vec.py)
SCHEDULES = ("cosine", "tri_stage", "constant")
DECODER_WIDTH_AT_768 = {"audio": 384, "image": 768, "text": 768}
GUARD_MIN_AFTER = 100
SHORT_RUN_UPDATES = 50_000  # past this a `short` recipe run is no longer short (a warning)


class ConfigError(ValueError):
    """A config key or value that cannot be used (one-line message)."""


@dataclass
class OptimizerConfig:
    lr: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.01
    clip_grad: float = 0.0  # max global grad norm; 0 = no clipping
    embed_lr_scale: float = 1.0  # text: the token embeddings step at this multiple of the scheduled lr


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine | tri_stage | constant
    warmup_steps: int | None = None  # cosine warmup in updates (wins when set) ...
    warmup_frac: float = 0.01  # ... or as a fraction of the run
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    tri_stage: list[float] = field(default_factory=lambda: [0.03, 0.90, 0.07])  # warmup / hold / decay fractions
    init_lr_scale: float = 0.01
    final_lr_scale: float = 0.01


@dataclass
class EMAConfig:
    decay: float = 0.999  # tau_0
    end_decay: float = 0.9999  # tau_e
    anneal_steps: int = 30000  # T


@dataclass
class LossConfig:
    beta: float = 0.0  # 0: L2; > 0: smooth L1 with this beta
    scale: float | None = None  # None: 1 / sqrt(hidden_size)
    reduce: str = "sum"  # over dims per masked position: sum | mean
    head_layers: int = 1  # 1: Linear(D, D); 2: Linear(D, 2D) -> GELU -> Linear(2D, D)
    head_input: str = "position"  # "position": the student's output there; "document": its item's visible mean
    cls_loss: float = 0.0  # data2vec2 image: weight of the CLS output regressing the mean patch target


@dataclass
class TeacherConfig:
    drop: list[str] = field(default_factory=list)  # student parts the teacher leaves out
    copy: list[str] = field(default_factory=list)  # student parameters the teacher shares (copied, not averaged)
    reads_student_features: bool = False  # True: the teacher encodes the student's front-end features
    mask_param: str | None = None  # student parameter written into masked front-end positions
    target_layers_of_12: int | None = None  # top-K target layers per 12, scaled to the depth; None: the modality's


@dataclass
class GuardConfig:  # fairseq's collapse thresholds; after None: min(5000, max(100, 10 % of the steps))
    min_target_var: float = 0.1
    min_pred_var: float = 0.01
    after: int | None = None


@dataclass
class SpanMaskConfig:  # audio, data2vec: fairseq's compute_mask_indices
    mask_prob: float = 0.65
    mask_length: int = 10
    min_masks: int = 2
    require_same_masks: bool = True


@dataclass
class BlockMaskConfig:  # image, data2vec: BEiT block masking
    num_mask_patches: int | None = None  # None: mask_fraction of the grid
    mask_fraction: float = 75 / 196
    min_block_patches: int = 16
    max_block_patches: int | None = None
    min_aspect: float = 0.3
    max_aspect: float | None = None


@dataclass
class TokenMaskConfig:  # text, data2vec: BERT masking, optionally in spans
    mask_prob: float = 0.15
    leave_unmasked_prob: float = 0.1
    random_token_prob: float = 0.1
    mask_span: int = 1


@dataclass
class MultiMaskConfig:  # audio and text, data2vec2: M masks per item, spans at an exact rate
    mask_prob: float = 0.5
    mask_length: int = 5
    num_masks: int = 8


@dataclass
class InverseBlockMaskConfig:  # image, data2vec2: keep blocks, mask the rest
    keep_patches: int | None = None  # None: keep_fraction of the grid
    keep_fraction: float = 39 / 196
    keep_block: int = 3
    num_masks: int = 16


MaskConfig = SpanMaskConfig | BlockMaskConfig | TokenMaskConfig | MultiMaskConfig | InverseBlockMaskConfig


@dataclass
class DecoderConfig:  # data2vec2's conv decoder
    dim: int | None = None  # None: the reference width x hidden / 768
    kernel: int = 7
    groups: int = 16
    layers: int = 4
    residual: bool = True
    input_dropout: float = 0.0
    mask_noise_std: float = 0.01


@dataclass
class DataSection:
    path: str | None = None
    num_workers: int = 2  # decoding threads
    prefetch: int = 2
    bucket_batches: int = 50  # similar-length batching window (batches)
    max_batch_cost: int | None = None  # padded samples / tokens per batch; None = batch_size only
    max_samples: int = 250000  # audio: random crop length
    min_samples: int = 0  # audio: shorter files are dropped
    pad_audio: bool = True  # audio: pad a batch (True) or crop it to its shortest item (False, fairseq)
    augment: bool = True  # image: random resized crop + flip
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333333333333])
    hflip: float = 0.5
    vocab_size: int | None = None  # text: None = the preset's vocabulary
    text_max_length: int | None = None  # text: None = the model's positions - 2
    min_frequency: int = 2
    text_mode: str = "chunk"


@dataclass
class TrainConfig:
    modality: str
    objective: str = "data2vec"  # a registry name: data2vec | data2vec2
    recipe: str | None = None  # None (the reference) | a recipe name, e.g. "short"
    preset: str = "tiny"
    steps: int | None = None  # optimizer updates in the whole run
    out: str | None = None
    init: str | None = None  # a d2v checkpoint to continue pretraining from
    seed: int = 1
    init_std: float = 0.02
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    cpu_bf16: bool = False
    batch_size: int = 8  # items per rank per micro-batch
    accum: int = 1
    save_every: int = 1000
    log_every: int = 1
    stop_at: int | None = None  # end this invocation (with a checkpoint) after this update
    progress: bool = True
    plot: bool = True  # draw curves.png beside metrics.jsonl when the run ends (also after a collapse or Ctrl-C)
    peak_tflops: float | None = None  # the device's peak for MFU; None: known GPUs only (training/flops.py)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    masking: MaskConfig = field(default_factory=SpanMaskConfig)
    decoder: DecoderConfig | None = None  # data2vec2 only
    model: dict[str, Any] = field(default_factory=dict)  # EncoderConfig overrides on top of the preset
    data: DataSection = field(default_factory=DataSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# The flat keys of the config before it was typed (checkpoints, scripts, `--set lr=...`), and where they live now.
LEGACY_KEYS = {
    "lr": "optimizer.lr", "betas": "optimizer.betas", "eps": "optimizer.eps",
    "weight_decay": "optimizer.weight_decay", "clip_grad": "optimizer.clip_grad",
    "embed_lr_scale": "optimizer.embed_lr_scale",
    "warmup_frac": "schedule.warmup_frac", "warmup_steps": "schedule.warmup_steps",
    "min_lr_ratio": "schedule.min_lr_ratio", "tri_stage": "schedule.tri_stage",
    "init_lr_scale": "schedule.init_lr_scale", "final_lr_scale": "schedule.final_lr_scale",
    "ema_decay": "ema.decay", "ema_end_decay": "ema.end_decay", "ema_anneal_steps": "ema.anneal_steps",
    "loss_beta": "loss.beta", "loss_scale": "loss.scale", "loss_reduce": "loss.reduce",
    "head_layers": "loss.head_layers", "head_input": "loss.head_input", "cls_loss": "loss.cls_loss",
    "target_layers_of_12": "teacher.target_layers_of_12",
}


# ------------------------------------------------------------------------------------------------ resolution


def resolve_config(modality: str, objective: str = "data2vec", recipe: str | None = None,
                   layers: list[dict[str, Any]] | tuple[dict[str, Any], ...] = ()) -> TrainConfig:
    """Defaults -> recipe -> each override layer (config file, flags, --set: nested dicts) -> a checked config."""
    cfg = reference_dict(modality, objective)
    if recipe is not None:
        merge(cfg, recipe_dict(recipe, modality, objective))
    for layer in layers:
        merge(cfg, layer)
    cfg["modality"], cfg["objective"], cfg["recipe"] = modality, objective, recipe
    return from_dict(cfg)


def reference_dict(modality: str, objective: str) -> dict[str, Any]:
    """The reference defaults of one modality x objective as a nested dict (what `--preset base` trains)."""
    from .objectives import get_objective

    if modality not in ("audio", "image", "text"):
        raise ConfigError(f"unknown modality {modality!r}; expected one of audio, image, text")
    table = get_objective(objective).REFERENCE[modality]
    cfg = TrainConfig(modality=modality, objective=objective, masking=table["masking_type"](),
                      decoder=DecoderConfig() if "decoder" in table else None).to_dict()
    merge(cfg, {k: v for k, v in table.items() if k != "masking_type"})
    return cfg


def recipe_dict(recipe: str, modality: str, objective: str) -> dict[str, Any]:
    from .objectives import get_objective

    recipes = get_objective(objective).RECIPES
    if recipe not in recipes:
        raise ConfigError(f"unknown recipe {recipe!r}; expected one of {', '.join(recipes)}")
    return copy.deepcopy(recipes[recipe][modality])


def recipe_names() -> list[str]:
    from .objectives import OBJECTIVES

    return sorted({name for obj in OBJECTIVES.values() for name in obj.RECIPES})


def merge(base: dict[str, Any], update: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Merge `update` into `base` in place. Keys must exist in `base` (old flat names are translated), except under
    `model` (EncoderConfig overrides, checked when the encoder config is built)."""
    for key, value in canonical(update, where).items():
        path = f"{where}{key}"
        if key not in base and where != "model.":
            raise ConfigError(f"unknown config key {path!r}{_suggest(key, base)}")
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value, f"{path}.")
        else:
            base[key] = copy.deepcopy(value)
    return base


def canonical(update: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Old flat keys (`lr`, `ema_decay`, `schedule="cosine"`, ...) rewritten to their sections (top level only)."""
    if where or not isinstance(update, dict):
        return update
    out: dict[str, Any] = {}
    for key, value in update.items():
        if key == "schedule" and not isinstance(value, dict):
            key, value = "schedule", {"name": value}
        elif key in LEGACY_KEYS:
            section, leaf = LEGACY_KEYS[key].split(".")
            key, value = section, {leaf: value}
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def set_assignment(assignment: str) -> dict[str, Any]:
    """One `key.path=value` as a nested dict; the value is JSON when it parses as JSON, else a plain string."""
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
    return update


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


def from_dict(data: dict[str, Any]) -> TrainConfig:
    """A nested dict (as `TrainConfig.to_dict` writes it) -> TrainConfig, every value checked against its type."""
    if not isinstance(data.get("modality"), str):
        raise ConfigError("config key 'modality' expects one of audio, image, text")
    masking_type = _masking_type(data.get("modality"), data.get("objective", "data2vec"))
    cfg = _build(TrainConfig, data, "", {"masking": masking_type})
    check(cfg)
    return cfg


def _masking_type(modality: str, objective: str) -> type:
    from .objectives import get_objective

    table = get_objective(objective).REFERENCE.get(modality)
    if table is None:
        raise ConfigError(f"unknown modality {modality!r}; expected one of audio, image, text")
    return table["masking_type"]


def _build(cls: type, data: Any, where: str, overrides: dict[str, type] | None = None) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config key {where.rstrip('.')!r} expects a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown config key {where}{key!r}{_suggest(key, dict.fromkeys(names))}")
    values = {}
    for name in names & set(data):
        hint = (overrides or {}).get(name, hints[name])
        values[name] = _value(hint, data[name], f"{where}{name}")
    return cls(**values)


def _value(hint: Any, value: Any, path: str) -> Any:
    """Coerce one value to its annotation: an int where a float is expected becomes a float, 2.0 where an int is
    expected becomes 2; anything else of the wrong kind is an error."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if all(dataclasses.is_dataclass(a) for a in options):  # the decoder section (or None)
            return _build(options[0], value, f"{path}.")
        return _value(options[0], value, path)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{path}.")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key {path!r} expects a list, got {value!r}")
        return [_value(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {path!r} expects a mapping, got {value!r}")
        return copy.deepcopy(value)
    if hint is Any:
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer():
        return int(value)
    if hint is str and isinstance(value, str):
        return value
    raise ConfigError(f"config key {path!r} expects {getattr(hint, '__name__', hint)}, got {value!r}")


def check(cfg: TrainConfig, need_data: bool = False) -> None:
    """Values that must hold before a run starts (need_data: also a data path, which --print-config does not need)."""
    from .objectives import OBJECTIVES

    for key in ("steps", "batch_size", "accum", "save_every", "log_every"):
        value, least = getattr(cfg, key), 0 if key == "steps" else 1  # steps 0: write the initial weights
        if key == "steps" and value is None and not need_data:
            continue
        if not isinstance(value, int) or value < least:
            kind = "a non-negative" if least == 0 else "a positive"
            raise ConfigError(f"{key} must be {kind} integer, got {value!r}")
    if need_data and not cfg.data.path:
        raise ConfigError("no training data: pass --data PATH")
    if cfg.objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {cfg.objective!r}")
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"precision must be auto, fp32, bf16 or fp16, got {cfg.precision!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {cfg.device!r}")
    if cfg.preset not in ("tiny", "small", "base"):
        raise ConfigError(f"preset must be tiny, small or base, got {cfg.preset!r}")
    if not cfg.optimizer.lr > 0:
        raise ConfigError(f"optimizer.lr must be a positive number, got {cfg.optimizer.lr!r}")
    if len(cfg.optimizer.betas) != 2 or not all(0 <= b < 1 for b in cfg.optimizer.betas):
        raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), got {cfg.optimizer.betas!r}")
    if cfg.schedule.name not in SCHEDULES:
        raise ConfigError(f"schedule.name must be one of {', '.join(SCHEDULES)}, got {cfg.schedule.name!r}")
    if cfg.loss.reduce not in ("sum", "mean"):
        raise ConfigError(f"loss.reduce must be 'sum' or 'mean', got {cfg.loss.reduce!r}")
    if cfg.loss.head_input not in HEAD_INPUTS:
        raise ConfigError(f"loss.head_input must be 'position' or 'document', got {cfg.loss.head_input!r}")
    if (cfg.decoder is None) != (cfg.objective == "data2vec"):
        raise ConfigError("decoder.* configures data2vec2's decoder: --objective data2vec has none")
    from .models import EncoderConfig

    hints = typing.get_type_hints(EncoderConfig)
    known = {f.name for f in dataclasses.fields(EncoderConfig)} - {"modality"}
    for key, value in cfg.model.items():
        if key not in known:
            raise ConfigError(f"unknown config key 'model.{key}'{_suggest(key, dict.fromkeys(known))}")
        cfg.model[key] = _value(hints[key], value, f"model.{key}")
    if cfg.decoder is not None and cfg.decoder.layers < 0:
        raise ConfigError(f"decoder.layers must be a non-negative integer, got {cfg.decoder.layers!r}")
    if cfg.decoder is not None and cfg.decoder.layers == 0 and cfg.loss.head_input != "document":
        raise ConfigError("decoder.layers 0 needs loss.head_input=document: without conv layers a masked position "
                          "would be predicted from its noise alone")
    if not cfg.optimizer.embed_lr_scale > 0:
        raise ConfigError(f"optimizer.embed_lr_scale must be a positive number, got {cfg.optimizer.embed_lr_scale!r}")
    if cfg.optimizer.embed_lr_scale != 1.0 and cfg.modality != "text":
        raise ConfigError("optimizer.embed_lr_scale scales the token embeddings' lr: text models only")


def resolve_derived(cfg: TrainConfig, hidden_size: int, num_patches: int | None) -> TrainConfig:
    """Fill the values left as None that depend on the model or the run: loss scale, image mask counts, decoder
    width, guard start (in place; returns cfg)."""
    if cfg.guard.after is None:
        cfg.guard.after = guard_after(int(cfg.steps or 0))
    if cfg.loss.scale is None:
        cfg.loss.scale = 1.0 / math.sqrt(hidden_size)
    masking = cfg.masking
    if isinstance(masking, BlockMaskConfig) and masking.num_mask_patches is None:
        masking.num_mask_patches = round(masking.mask_fraction * num_patches)
    if isinstance(masking, InverseBlockMaskConfig) and masking.keep_patches is None:
        masking.keep_patches = max(1, round(masking.keep_fraction * num_patches))
    if cfg.decoder is not None and cfg.decoder.dim is None:
        cfg.decoder.dim = max(1, round(DECODER_WIDTH_AT_768[cfg.modality] * hidden_size / 768))
    return cfg


def guard_after(steps: int) -> int:
    """Updates before the collapse guard starts: fairseq's 5000, or 10 % of a shorter run but at least 100 (in the
    first updates a small model's predictions are still near zero: pred_var < 0.01 there is no collapse)."""
    return min(5000, max(GUARD_MIN_AFTER, steps // 10))


def recipe_warnings(cfg: TrainConfig) -> list[str]:
    """What a user should hear before a run whose recipe does not fit it."""
    notes = []
    if cfg.recipe == "short" and cfg.preset == "base":
        notes.append("recipe 'short' was tuned on tiny models for a few thousand updates; at preset base the "
                     "reference defaults (no --recipe) are the validated recipe")
    if cfg.recipe == "short" and (cfg.steps or 0) > SHORT_RUN_UPDATES:
        notes.append(f"recipe 'short' was tuned for a few thousand updates; {cfg.steps} updates is past "
                     f"{SHORT_RUN_UPDATES}, where the reference defaults (no --recipe) are the validated recipe")
    return notes


def _suggest(key: str, known: dict[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; known keys here: {', '.join(sorted(known))}"
