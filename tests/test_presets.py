"""`base` and `large` presets are the published architectures: built from the published config values, a transformers
model's every weight maps onto our preset with the same shape (on the meta device: nothing is allocated)."""

from __future__ import annotations

import pytest
import torch

from d2v.training.import_hf import encoder_config_from_hf, map_state_dict
from d2v.training.models import EncoderConfig, build_encoder

LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
# Values of facebook/data2vec-{audio,vision,text}-{base,large}; the transformers class defaults differ for text/vision.
PUBLISHED = {
    "audio": dict(conv_bias=False, num_conv_pos_embeddings=5, conv_pos_kernel_size=19, layer_norm_eps=1e-5),
    "image": dict(use_shared_relative_position_bias=True, use_relative_position_bias=False, use_mean_pooling=False,
                  layer_scale_init_value=0.1, layer_norm_eps=1e-12, image_size=224, patch_size=16),
    "text": dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
                 pad_token_id=1, bos_token_id=0, eos_token_id=2),
}
ARCHITECTURE = ("hidden_size", "num_layers", "num_heads", "ffn_size", "layer_norm_eps", "layer_norm_first",
                "conv_layers", "conv_bias", "pos_conv_layers", "pos_conv_kernel", "pos_conv_groups", "image_size",
                "patch_size", "layer_scale_init", "rel_pos_bias", "mean_pooling", "vocab_size", "max_positions",
                "type_vocab_size", "pad_id", "target_layers")


def _hf_model(modality: str, size: str):
    import transformers as T

    cls = {"audio": (T.Data2VecAudioConfig, T.Data2VecAudioModel), "image": (T.Data2VecVisionConfig,
           T.Data2VecVisionModel), "text": (T.Data2VecTextConfig, T.Data2VecTextModel)}[modality]
    config = cls[0](**PUBLISHED[modality], **(LARGE if size == "large" else {}))
    with torch.device("meta"):
        return config, cls[1](config)


@pytest.mark.parametrize("size", ["base", "large"])
@pytest.mark.parametrize("modality", ["audio", "image", "text"])
def test_preset_equals_published_architecture(modality, size):
    hf_config, hf_model = _hf_model(modality, size)
    preset = EncoderConfig.preset(modality, size)
    imported = encoder_config_from_hf(hf_config.to_dict())
    for name in ARCHITECTURE:
        assert getattr(preset, name) == getattr(imported, name), name
    with torch.device("meta"):
        ours = build_encoder(preset).state_dict()
    mapped, _ = map_state_dict(modality, hf_model.state_dict(), ours)
    assert set(mapped) | {"mask_embedding", "mask_token"} >= set(ours)
    hf_count = sum(v.numel() for k, v in hf_model.state_dict().items() if not k.startswith("pooler.dense"))
    assert sum(v.numel() for k, v in ours.items() if k in mapped) == hf_count


def test_target_layers_follow_an_overridden_depth():
    assert EncoderConfig.preset("audio", "tiny", num_layers=12).target_layers == 8
    assert EncoderConfig.preset("text", "tiny", num_layers=2, target_layers=1).target_layers == 1
    assert EncoderConfig.preset("text", "base").target_layers == 10  # the paper's K of the published model
    assert EncoderConfig.preset("text", "base", num_layers=6).target_layers == 5  # in proportion, never > depth
