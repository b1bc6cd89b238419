"""One config dataclass for every encoder, and the size presets.

`base` and `large` equal the published data2vec checkpoints (facebook/data2vec-{audio,vision,text}-{base,large});
`tiny` and `small` are ours, for tests, demos and small machines.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from d2v_serve.preprocess import MODALITIES

PRESETS = ("tiny", "small", "base", "large")

# wav2vec 2.0 / data2vec feature encoder: 320 samples per frame, receptive field 400.
BASE_CONV_LAYERS = [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2


@dataclass
class EncoderConfig:
    modality: str
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_size: int = 3072
    layer_norm_eps: float = 1e-5
    layer_norm_first: bool = False  # pre-LN blocks (image) or post-LN blocks (audio, text)
    activation: str = "gelu"  # the FFN's: one of ACTIVATIONS (training/models/transformer.py)
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    layerdrop: float = 0.0
    drop_path: float = 0.0

    # data2vec target space: mean of the top-K layer outputs, each normalised.
    target_layers: int = 8
    target_source: str = "ffn"  # "ffn": FFN output before the last residual; "block": full block output
    target_norm: str = "instance"  # per-layer: "instance" (over time, per channel), "layer" (no affine) or "none"
    target_final_norm: bool = False  # layer norm after averaging

    # audio front end
    conv_layers: list[list[int]] = field(default_factory=lambda: [list(c) for c in BASE_CONV_LAYERS])
    conv_bias: bool = False
    feature_dropout: float = 0.0
    pos_conv_layers: int = 5
    pos_conv_kernel: int = 19
    pos_conv_groups: int = 16

    # image front end
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    layer_scale_init: float = 0.1  # 0 disables layer scale
    rel_pos_bias: str = "shared"  # "none", "shared" (one table for all layers), "per_layer" or "both" (summed)
    abs_pos_embed: bool = False  # learned absolute position embeddings added to CLS + patches (BEiT option)
    mean_pooling: bool = False  # True: no final norm (identity); pooled output = mean of the patch tokens ...
    pool_norm: bool = True  # ... layer-normed (False: plain mean, as a transformers model saved without its pooler)

    # text front end
    vocab_size: int = 50265
    max_positions: int = 514
    type_vocab_size: int = 1
    pad_id: int = 1

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"unknown modality {self.modality!r}; expected one of {', '.join(MODALITIES)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if not 1 <= self.target_layers <= self.num_layers:
            raise ValueError(f"target_layers must be in 1..{self.num_layers}, got {self.target_layers}")
        if self.rel_pos_bias not in ("none", "shared", "per_layer", "both"):
            raise ValueError(f"rel_pos_bias must be none, shared, per_layer or both, got {self.rel_pos_bias!r}")
        if self.activation not in ACTIVATION_NAMES:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATION_NAMES)}, got {self.activation!r}")
        if self.modality == "image" and self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        self.conv_layers = [list(map(int, c)) for c in self.conv_layers]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EncoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown encoder config keys: {', '.join(unknown)}")
        return cls(**values)

    def replace(self, **overrides: Any) -> EncoderConfig:
        return dataclasses.replace(self, **overrides)

    @classmethod
    def preset(cls, modality: str, name: str, top_k_of_12: int | None = None, **overrides: Any) -> EncoderConfig:
        """`top_k_of_12`: target layers per 12, scaled to the depth (None: the modality's data2vec K)."""
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
        values = {**MODALITY_DEFAULTS[modality], **SIZES[name], **SIZE_MODALITY[name].get(modality, {}), **overrides}
        k_of_12 = TOP_K_OF_12[modality] if top_k_of_12 is None else top_k_of_12
        values.setdefault("target_layers", _scaled_top_k(k_of_12, values["num_layers"], name))
        return cls(modality=modality, **values)


TOP_K_OF_12 = {"audio": 8, "image": 6, "text": 10}
# transformers' names (ACT2FN) for the FFN activations d2v implements.
ACTIVATION_NAMES = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish")

MODALITY_DEFAULTS: dict[str, dict[str, Any]] = {
    "audio": dict(layer_norm_eps=1e-5, layer_norm_first=False, target_source="ffn", target_norm="instance",
                  target_final_norm=False),
    "image": dict(layer_norm_eps=1e-12, layer_norm_first=True, target_source="block", target_norm="layer",
                  target_final_norm=True, dropout=0.0, attention_dropout=0.0, layer_scale_init=0.1,
                  rel_pos_bias="shared"),
    "text": dict(layer_norm_eps=1e-5, layer_norm_first=False, target_source="ffn", target_norm="layer",
                 target_final_norm=False),
}

SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, num_layers=4, num_heads=4, ffn_size=256),
    "small": dict(hidden_size=384, num_layers=6, num_heads=6, ffn_size=1536),
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, ffn_size=3072),
    "large": dict(hidden_size=1024, num_layers=24, num_heads=16, ffn_size=4096),
}

SIZE_MODALITY: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "audio": dict(conv_layers=[[64, 10, 5]] + [[64, 3, 2]] * 4 + [[64, 2, 2]] * 2, pos_conv_layers=2),
        "image": dict(image_size=64, patch_size=8),
        "text": dict(vocab_size=2048, max_positions=258),
    },
    "small": {
        "audio": dict(conv_layers=[[256, 10, 5]] + [[256, 3, 2]] * 4 + [[256, 2, 2]] * 2, pos_conv_layers=3),
        "text": dict(vocab_size=8192, max_positions=514),
    },
    "base": {},
    "large": {},
}


def _scaled_top_k(k_of_12: int, num_layers: int, preset: str) -> int:
    if preset in ("base", "large"):  # the published models' K, in proportion when the depth is overridden
        return max(1, round(k_of_12 * num_layers / SIZES[preset]["num_layers"]))
    return max(1, round(k_of_12 * num_layers / 12))
