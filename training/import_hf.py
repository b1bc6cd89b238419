"""d2v-import-hf: a local transformers-layout Data2Vec{Audio,Vision,Text} directory -> a d2v checkpoint."""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from d2v_serve.console import add_version

from .checkpoint import CheckpointError, load_encoder, make_checkpoint, save_checkpoint
from .hf_keys import DERIVED_SUFFIXES, HEAD_PREFIXES, MODEL_PREFIXES, OPTIONAL, map_key
from .models import EncoderConfig, build_encoder
from .models.config import ACTIVATION_NAMES, TOP_K_OF_12

MODEL_TYPES = {"data2vec-audio": "audio", "data2vec-vision": "image", "data2vec-text": "text"}


class HFImportError(Exception):
    """An HF directory we cannot import; one line for the user."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise HFImportError(f"{path}: unreadable JSON ({e})") from None


def _require(hf: dict[str, Any], key: str, allowed: tuple[Any, ...]) -> None:
    if key in hf and hf[key] not in allowed:
        raise HFImportError(f"config.json has {key}={hf[key]!r}; d2v supports {' or '.join(map(repr, allowed))}")


def _top_k(modality: str, num_layers: int) -> int:
    k = TOP_K_OF_12[modality]
    return k if num_layers >= 12 else max(1, round(k * num_layers / 12))


def encoder_config_from_hf(hf: dict[str, Any], weight_names: Iterable[str] | None = None) -> EncoderConfig:
    """Our config for a transformers config.json. `weight_names` (the checkpoint's keys) settles what the config
    does not say: whether an image model was saved with its pooler (a constructor argument in transformers)."""
    modality = MODEL_TYPES.get(hf.get("model_type", ""))
    if modality is None:
        raise HFImportError(f"config.json model_type {hf.get('model_type')!r} is not one of {', '.join(MODEL_TYPES)}")
    _require(hf, "hidden_act", ACTIVATION_NAMES)
    common = dict(
        hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        ffn_size=hf["intermediate_size"], layer_norm_eps=hf["layer_norm_eps"], activation=hf.get("hidden_act", "gelu"),
    )
    if modality == "audio":
        _require(hf, "feat_extract_activation", ("gelu",))
        _require(hf, "feat_extract_norm", ("layer",))
        _require(hf, "do_stable_layer_norm", (False,))
        _require(hf, "add_adapter", (False,))
        return EncoderConfig.preset("audio", "base").replace(
            **common,
            dropout=hf.get("hidden_dropout", 0.1), attention_dropout=hf.get("attention_dropout", 0.1),
            activation_dropout=hf.get("activation_dropout", 0.0), layerdrop=hf.get("layerdrop", 0.0),
            conv_layers=[list(c) for c in zip(hf["conv_dim"], hf["conv_kernel"], hf["conv_stride"], strict=True)],
            conv_bias=hf.get("conv_bias", False), feature_dropout=hf.get("feat_proj_dropout", 0.0),
            # transformers 5.x: num_conv_pos_embeddings counts the positional conv layers.
            pos_conv_layers=hf["num_conv_pos_embeddings"], pos_conv_kernel=hf["conv_pos_kernel_size"],
            pos_conv_groups=hf["num_conv_pos_embedding_groups"],
            target_layers=_top_k("audio", hf["num_hidden_layers"]),
        )
    if modality == "image":
        shared, per_layer = hf.get("use_shared_relative_position_bias"), hf.get("use_relative_position_bias")
        rel = "both" if shared and per_layer else "shared" if shared else "per_layer" if per_layer else "none"
        mean_pooling = hf.get("use_mean_pooling", True)
        pool_norm = weight_names is None or any(n.endswith("pooler.layernorm.weight") for n in weight_names)
        image_size = hf.get("image_size", 224)
        if isinstance(image_size, list | tuple):
            if len(set(image_size)) != 1:
                raise HFImportError(f"config.json image_size {image_size} is not square")
            image_size = image_size[0]
        return EncoderConfig.preset("image", "base").replace(
            **common,
            dropout=hf.get("hidden_dropout_prob", 0.0), attention_dropout=hf.get("attention_probs_dropout_prob", 0.0),
            drop_path=hf.get("drop_path_rate", 0.0), image_size=image_size, patch_size=hf["patch_size"],
            num_channels=hf.get("num_channels", 3), layer_scale_init=hf.get("layer_scale_init_value", 0.1),
            rel_pos_bias=rel, abs_pos_embed=bool(hf.get("use_absolute_position_embeddings")),
            mean_pooling=mean_pooling, pool_norm=mean_pooling and pool_norm,
            target_layers=_top_k("image", hf["num_hidden_layers"]),
        )
    _require(hf, "position_embedding_type", ("absolute",))
    _require(hf, "is_decoder", (False,))  # causal self-attention: a decoder, not an encoder
    _require(hf, "add_cross_attention", (False,))
    return EncoderConfig.preset("text", "base").replace(
        **common,
        dropout=hf.get("hidden_dropout_prob", 0.1), attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        vocab_size=hf["vocab_size"], max_positions=hf["max_position_embeddings"],
        type_vocab_size=hf.get("type_vocab_size", 1), pad_id=hf.get("pad_token_id", 1),
        target_layers=_top_k("text", hf["num_hidden_layers"]),
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    safetensors_file = directory / "model.safetensors"
    if safetensors_file.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(safetensors_file))
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ... on foreign or truncated bytes
            raise HFImportError(f"{safetensors_file}: not a readable safetensors file ({_first_line(e)})") from None
    bin_file = directory / "pytorch_model.bin"
    if bin_file.is_file():
        try:
            with warnings.catch_warnings():  # the unpickler warns about protocols on foreign pickles
                warnings.simplefilter("ignore")
                return torch.load(bin_file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:  # a pickle that wants more than tensors: code, or foreign objects
            # torch's message: a paragraph of advice, the unpickler's reason, a link; keep the reason
            paragraphs = [" ".join(part.split()) for part in str(e).split("\n\n") if part.strip()]
            reason = "; ".join(p for p in paragraphs[1:] if not p.startswith("Check the documentation"))
            raise HFImportError(f"{bin_file}: refused: the pickle holds more than weights "
                                f"({reason[:200] or _first_line(e)}); nothing in it was run") from None
        except Exception as e:  # noqa: BLE001 - the unpickler raises anything on foreign bytes (EOFError, ...)
            raise HFImportError(f"{bin_file}: not a readable PyTorch weights file ({_first_line(e)})") from None
    if any(directory.glob("*.safetensors.index.json")) or any(directory.glob("pytorch_model.bin.index.json")):
        raise HFImportError(f"{directory}: sharded checkpoints are not supported; merge the shards first")
    raise HFImportError(f"{directory}: no model.safetensors or pytorch_model.bin")


def map_state_dict(modality: str, theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]
                   ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map every published key onto ours. Returns the mapped weights and the task-head keys that were dropped.
    Unknown keys, missing keys and shape mismatches raise, listing every offender."""
    prefix = MODEL_PREFIXES[modality]
    # Saved from a ...For<Task> class, the encoder sits under the prefix and everything else is the task's head.
    with_head = any(key.startswith(prefix) for key in theirs)
    mapped: dict[str, torch.Tensor] = {}
    dropped, unknown, mismatched = [], [], []
    for key, value in theirs.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        if (with_head and not key.startswith(prefix)) or name.startswith(HEAD_PREFIXES):
            dropped.append(key)
            continue
        if name.endswith(DERIVED_SUFFIXES):
            continue
        target = map_key(modality, name)
        if target is None or target not in ours:
            unknown.append(key)
        elif tuple(value.shape) != tuple(ours[target].shape):
            mismatched.append(f"{key} {tuple(value.shape)} vs {target} {tuple(ours[target].shape)}")
        else:
            mapped[target] = value.to(torch.float32)
    missing = sorted(set(ours) - set(mapped) - OPTIONAL[modality])
    problems = []
    if unknown:
        problems.append(f"unknown keys: {', '.join(sorted(unknown))}")
    if missing:
        problems.append(f"missing keys (ours): {', '.join(missing)}")
    if mismatched:
        problems.append(f"shape mismatches: {'; '.join(mismatched)}")
    if problems:
        raise HFImportError(" | ".join(problems))
    return mapped, sorted(dropped)


def hf_preprocessing(modality: str, directory: Path, cfg: EncoderConfig) -> dict[str, Any]:
    from d2v_serve.preprocess import AudioPreprocessing, ImagePreprocessing

    pre_file = directory / "preprocessor_config.json"
    pre = _read_json(pre_file) if pre_file.is_file() else {}
    if modality == "audio":
        return AudioPreprocessing(sample_rate=int(pre.get("sampling_rate", 16000)),
                                  normalize=bool(pre.get("do_normalize", True))).to_dict()
    if modality == "image":
        return _image_preprocessing(pre, cfg, ImagePreprocessing).to_dict()
    return _text_preprocessing(directory, cfg)


def _image_preprocessing(pre: dict[str, Any], cfg: EncoderConfig, cls: type) -> Any:
    interpolation = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(pre.get("resample", 3), "bicubic")
    mean = pre.get("image_mean", [0.5, 0.5, 0.5])
    std = pre.get("image_std", [0.5, 0.5, 0.5])
    size = pre.get("size", cfg.image_size)
    if pre.get("do_center_crop"):
        resize = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
        return cls(image_size=cfg.image_size, resize_size=int(resize), crop="center", interpolation=interpolation,
                   mean=list(mean), std=list(std))
    # The HF processor resizes straight to the model's square, without keeping the aspect ratio.
    return cls(image_size=cfg.image_size, resize_size=cfg.image_size, crop="none", interpolation=interpolation,
               mean=list(mean), std=list(std))


def _text_preprocessing(directory: Path, cfg: EncoderConfig) -> dict[str, Any]:
    from d2v_serve.preprocess import TextPreprocessing
    from d2v_serve.preprocess.text import tokenizer_from_hf_files

    max_length = cfg.max_positions - cfg.pad_id - 1  # RoBERTa positions start after the padding index
    tok_cfg_file = directory / "tokenizer_config.json"
    if tok_cfg_file.is_file():
        declared = _read_json(tok_cfg_file).get("model_max_length")
        if isinstance(declared, int) and 0 < declared < max_length:
            max_length = declared
    try:
        pre = TextPreprocessing.from_tokenizer(tokenizer_from_hf_files(directory), max_length=max_length)
    except (OSError, ValueError) as e:
        raise HFImportError(f"{directory}: no usable RoBERTa tokenizer ({e})") from None
    if pre.pad_id != cfg.pad_id:
        raise HFImportError(f"tokenizer pad id {pre.pad_id} differs from config.json pad_token_id {cfg.pad_id}")
    return pre.to_dict()


def import_hf(directory: str | Path) -> tuple[dict[str, Any], list[str]]:
    directory = Path(directory)
    if not directory.is_dir():
        raise HFImportError(f"{directory}: not a directory; d2v-import-hf reads a local copy of a checkpoint "
                            "(config.json, weights, preprocessor files) and downloads nothing: fetch a hub id first "
                            "(huggingface_hub's snapshot_download, or git clone) and pass that directory")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise HFImportError(f"{directory}: no config.json")
    hf = _read_json(config_file)
    weights = read_hf_weights(directory)
    try:
        cfg = encoder_config_from_hf(hf, weights)
    except KeyError as e:
        raise HFImportError(f"config.json lacks {e}") from None
    encoder = build_encoder(cfg)
    ours = encoder.state_dict()
    mapped, dropped = map_state_dict(cfg.modality, weights, ours)
    state = {**ours, **mapped}
    ckpt = make_checkpoint(cfg, state, hf_preprocessing(cfg.modality, directory, cfg))
    ckpt["source"] = {"kind": "transformers", "directory": directory.name,
                      "architectures": hf.get("architectures", []), "dropped_head_keys": len(dropped)}
    load_encoder(ckpt)  # proves the checkpoint is whole before anything is written
    return ckpt, dropped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="d2v-import-hf",
        description="Import a local transformers Data2Vec{Audio,Vision,Text} directory as a d2v checkpoint.")
    parser.add_argument("hf_dir", help="directory with config.json, model.safetensors or pytorch_model.bin, "
                        "tokenizer files (text) and preprocessor_config.json (when present)")
    parser.add_argument("-o", "--output", required=True, help="checkpoint path to write (.pt)")
    add_version(parser)
    args = parser.parse_args(argv)
    try:
        ckpt, dropped = import_hf(args.hf_dir)
    except (HFImportError, CheckpointError) as e:
        print(f"d2v-import-hf: error: {e}", file=sys.stderr)
        return 1
    save_checkpoint(args.output, ckpt)
    cfg = ckpt["config"]
    note = f"; dropped {len(dropped)} task-head keys ({dropped[0].split('.')[0]}...)" if dropped else ""
    print(f"imported {ckpt['modality']} encoder: {cfg['num_layers']} layers x {cfg['hidden_size']}, "
          f"{sum(v.numel() for v in ckpt['model'].values()):,} parameters -> {args.output}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
