"""Our encoders are the published functions: import a random transformers Data2Vec model, run ours on a padded
batch of mixed lengths, and compare every item with transformers run on that item alone."""

from __future__ import annotations

import pytest
import torch

from tests.hf_models import hf_audio, hf_image, hf_text
from training.checkpoint import load_encoder
from training.import_hf import import_hf

TOL = 1e-5


def _assert_close_valid(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOL, f"{what}: max abs diff {diff:.3g} > {TOL}"


def _compare_items(our_out, hf_outs, lengths) -> None:
    assert len(our_out.hidden_states) == len(hf_outs[0].hidden_states)
    for b, (hf_out, n) in enumerate(zip(hf_outs, lengths, strict=True)):
        assert int(our_out.valid_mask[b].sum()) == n
        _assert_close_valid(our_out.last_hidden_state[b, :n], hf_out.last_hidden_state[0], f"item {b} last")
        for layer, (ours, theirs) in enumerate(zip(our_out.hidden_states, hf_out.hidden_states, strict=True)):
            _assert_close_valid(ours[b, :n], theirs[0], f"item {b} hidden state {layer}")


def _import(builder, tmp_path, **overrides):
    import transformers as T

    hf_dir = builder(tmp_path / "hf", **overrides)
    ckpt, _ = import_hf(hf_dir)
    kwargs = {"add_pooling_layer": True} if builder is hf_image else {}
    hf_model = T.AutoModel.from_pretrained(hf_dir, **kwargs).eval()  # a local directory, never a hub id
    return load_encoder(ckpt), hf_model, ckpt


@pytest.mark.parametrize("overrides", [
    {},
    # a conv stack that differs from the default, an even positional kernel, more positional layers
    {"conv_dim": [16, 24, 32], "conv_kernel": [8, 4, 3], "conv_stride": [4, 3, 2], "conv_bias": True,
     "conv_pos_kernel_size": 4, "num_conv_pos_embeddings": 4},
], ids=["default-conv", "custom-conv"])
def test_audio_matches_transformers_item_by_item(tmp_path, overrides):
    ours, theirs, _ = _import(hf_audio, tmp_path, **overrides)
    torch.manual_seed(1)
    sample_lengths = [6400, 3333, 4800, 2000]
    batch = torch.zeros(len(sample_lengths), max(sample_lengths))
    mask = torch.zeros_like(batch, dtype=torch.long)
    items = []
    for b, n in enumerate(sample_lengths):
        x = torch.randn(n)
        items.append(x)
        batch[b, :n] = x
        mask[b, :n] = 1
    batch[mask == 0] = 7.0  # garbage in padded samples must not matter either
    with torch.no_grad():
        out = ours(batch, mask)
        hf_outs = [theirs(x[None], output_hidden_states=True) for x in items]
    _compare_items(out, hf_outs, [h.last_hidden_state.shape[1] for h in hf_outs])


def test_transformers_audio_batching_leaks_padding(tmp_path):
    """The trap we fix: transformers' own padded batch differs from the item alone (several pos-conv layers)."""
    _, theirs, _ = _import(hf_audio, tmp_path)
    torch.manual_seed(2)
    long, short = torch.randn(6400), torch.randn(3000)
    batch = torch.zeros(2, 6400)
    batch[0], batch[1, :3000] = long, short
    mask = torch.zeros(2, 6400, dtype=torch.long)
    mask[0], mask[1, :3000] = 1, 1
    with torch.no_grad():
        alone = theirs(short[None]).last_hidden_state[0]
        batched = theirs(batch, attention_mask=mask).last_hidden_state[1, : alone.shape[0]]
    assert (alone - batched).abs().max().item() > 1e-3


@pytest.mark.parametrize("overrides", [
    {"use_shared_relative_position_bias": True, "use_relative_position_bias": False, "use_mean_pooling": False},
    {"use_shared_relative_position_bias": False, "use_relative_position_bias": True, "use_mean_pooling": True},
    {"use_shared_relative_position_bias": False, "use_relative_position_bias": False, "use_mean_pooling": False},
], ids=["shared-bias", "per-layer-bias-mean-pool", "no-bias"])
def test_image_matches_transformers_item_by_item(tmp_path, overrides):
    ours, theirs, _ = _import(hf_image, tmp_path, **overrides)
    torch.manual_seed(3)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = ours(pixels)
        hf_outs = [theirs(pixels[b: b + 1], output_hidden_states=True) for b in range(3)]
        _compare_items(out, hf_outs, [17] * 3)
        pooled = ours.pooled(out)
    for b, hf_out in enumerate(hf_outs):
        _assert_close_valid(pooled[b], hf_out.pooler_output[0], f"item {b} pooled")


def test_text_matches_transformers_item_by_item(tmp_path):
    ours, theirs, _ = _import(hf_text, tmp_path)
    torch.manual_seed(4)
    lengths = [12, 5, 9, 3]
    pad = 1
    ids = torch.full((len(lengths), max(lengths)), pad)
    mask = torch.zeros_like(ids)
    items = []
    for b, n in enumerate(lengths):
        x = torch.cat([torch.tensor([0]), torch.randint(5, 300, (n - 2,)), torch.tensor([2])])
        items.append(x)
        ids[b, :n], mask[b, :n] = x, 1
    with torch.no_grad():
        out = ours(ids, mask)
        hf_outs = [theirs(x[None], output_hidden_states=True) for x in items]
    _compare_items(out, hf_outs, lengths)


def test_imported_text_checkpoint_carries_tokenizer(tmp_path):
    from tokenizers import Tokenizer

    _, _, ckpt = _import(hf_text, tmp_path)
    pre = ckpt["preprocessing"]
    assert (pre["bos_id"], pre["pad_id"], pre["eos_id"]) == (0, 1, 2)
    assert pre["max_length"] == 64  # tokenizer_config.json's model_max_length
    ids = Tokenizer.from_str(pre["tokenizer"]).encode("The teacher sees the whole sentence.").ids
    assert ids[0] == 0 and ids[-1] == 2
