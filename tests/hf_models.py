"""Small random transformers Data2Vec models saved in the published layout (no hub access, ever)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CORPUS = [
    "data2vec learns contextualized representations from masked inputs.",
    "The teacher sees the whole sentence; the student sees a masked view.",
    "Speech, images and text share one learning method.",
    "An exponential moving average of the student gives the teacher.",
    "Padding must never change what a model computes for an item.",
] * 4


def write_roberta_tokenizer(directory: Path, vocab_size: int = 300) -> int:
    """A byte-level BPE with RoBERTa's special tokens, saved as vocab.json + merges.txt. Returns the vocab size."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(CORPUS, vocab_size=vocab_size, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok.save_model(str(directory))
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return tok.get_vocab_size()


def hf_audio(directory: Path, model_class: str = "Data2VecAudioModel", **overrides) -> Path:
    """`model_class`: the bare model or a task class (Data2VecAudioForCTC, ...), saved as transformers saves it."""
    import transformers as T

    values = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                  conv_dim=[32, 32, 32, 32], conv_kernel=[10, 3, 3, 2], conv_stride=[5, 2, 2, 2],
                  num_conv_pos_embeddings=3, conv_pos_kernel_size=5, num_conv_pos_embedding_groups=4,
                  mask_time_prob=0.05)
    values.update(overrides)
    torch.manual_seed(0)
    model = getattr(T, model_class)(T.Data2VecAudioConfig(**values)).eval()
    _randomize_norms(model)
    model.save_pretrained(directory)
    T.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=True,
                               return_attention_mask=True).save_pretrained(directory)
    return directory


def hf_image(directory: Path, model_class: str = "Data2VecVisionModel", add_pooling_layer: bool | None = True,
             **overrides) -> Path:
    """`add_pooling_layer` (bare model only): None leaves transformers' default (no pooler)."""
    import transformers as T

    values = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                  image_size=32, patch_size=8, use_relative_position_bias=False,
                  use_shared_relative_position_bias=True, use_mean_pooling=False, layer_scale_init_value=0.1,
                  use_mask_token=True, layer_norm_eps=1e-12)
    values.update(overrides)
    torch.manual_seed(0)
    pooling = {} if add_pooling_layer is None or model_class != "Data2VecVisionModel" else {
        "add_pooling_layer": add_pooling_layer}
    model = getattr(T, model_class)(T.Data2VecVisionConfig(**values), **pooling).eval()
    _randomize_norms(model)
    with torch.no_grad():  # random relative position bias, so a wrong index would show
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name or "lambda" in name or "position_embeddings" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(directory)
    T.BeitImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False, image_mean=[0.5] * 3,
                         image_std=[0.5] * 3).save_pretrained(directory)
    return directory


def hf_text(directory: Path, model_class: str = "Data2VecTextModel", **overrides) -> Path:
    import transformers as T

    directory.mkdir(parents=True, exist_ok=True)
    vocab = write_roberta_tokenizer(directory)
    values = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1,
                  bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)
    values.update(overrides)
    torch.manual_seed(0)
    model = getattr(T, model_class)(T.Data2VecTextConfig(**values)).eval()
    _randomize_norms(model)
    model.save_pretrained(directory)
    return directory


def _randomize_norms(model: torch.nn.Module) -> None:
    """Default LayerNorm weights (1, 0) would hide a swapped weight/bias mapping."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower():
                p.add_(torch.randn_like(p) * 0.1)


HF_BUILDERS = {"audio": hf_audio, "image": hf_image, "text": hf_text}
