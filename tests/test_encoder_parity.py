"""Our encoders are the published functions: import a random transformers Data2Vec model, run ours on a padded
batch of mixed lengths, and compare every item with transformers run on that item alone."""

from __future__ import annotations

import pytest
import torch

from d2v.training.checkpoint import load_encoder
from d2v.training.import_hf import import_hf
from tests.hf_models import hf_audio, hf_image, hf_text
from tests.tolerance import assert_close_at_scale

TOL = 1e-5


def _assert_close_valid(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert_close_at_scale(ours, theirs, TOL, what)  # pre-LN residual streams grow: the tolerance grows with them


def _compare_items(our_out, hf_outs, lengths) -> None:
    assert len(our_out.hidden_states) == len(hf_outs[0].hidden_states)
    for b, (hf_out, n) in enumerate(zip(hf_outs, lengths, strict=True)):
        assert int(our_out.valid_mask[b].sum()) == n
        _assert_close_valid(our_out.last_hidden_state[b, :n], hf_out.last_hidden_state[0], f"item {b} last")
        for layer, (ours, theirs) in enumerate(zip(our_out.hidden_states, hf_out.hidden_states, strict=True)):
            _assert_close_valid(ours[b, :n], theirs[0], f"item {b} hidden state {layer}")


def _import(builder, tmp_path, model_class=None, **overrides):
    """Save a random transformers model (bare or with a task head), import it, and load transformers' encoder of it
    back: the bare model, or the base model inside the task class."""
    import transformers as T

    kwargs = {"model_class": model_class} if model_class else {}
    hf_dir = builder(tmp_path / "hf", **kwargs, **overrides)
    ckpt, _ = import_hf(hf_dir)
    cls = getattr(T, model_class) if model_class else T.AutoModel
    pooling = {"add_pooling_layer": overrides.get("add_pooling_layer", True)} if builder is hf_image and (
        not model_class or model_class == "Data2VecVisionModel") else {}
    if pooling.get("add_pooling_layer") is None:
        pooling = {}
    model = cls.from_pretrained(hf_dir, **pooling).eval()  # a local directory, never a hub id
    return load_encoder(ckpt), getattr(model, model.base_model_prefix, model), ckpt


def _audio_items(ours, theirs):
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


def _image_items(ours, theirs):
    torch.manual_seed(3)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = ours(pixels)
        hf_outs = [theirs(pixels[b: b + 1], output_hidden_states=True) for b in range(3)]
        _compare_items(out, hf_outs, [17] * 3)
        pooled = ours.pooled(out)
    for b, hf_out in enumerate(hf_outs):
        if hf_out.pooler_output is not None:
            _assert_close_valid(pooled[b], hf_out.pooler_output[0], f"item {b} pooled")
    if theirs.config.use_mean_pooling:  # transformers has no final norm there: ours must be exactly none
        assert isinstance(ours.final_norm, torch.nn.Identity)
        assert (ours.pool_norm is None) == (theirs.pooler is None)


def _text_items(ours, theirs):
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


COMPARE = {hf_audio: _audio_items, hf_image: _image_items, hf_text: _text_items}
SHARED, PER_LAYER = {"use_shared_relative_position_bias": True}, {"use_relative_position_bias": True}
NO_BIAS = {"use_shared_relative_position_bias": False, "use_relative_position_bias": False}

# Every configuration transformers can build and save for the three model types, as far as the encoder differs:
# (builder, model class or None for the bare model, config overrides [+ add_pooling_layer for a bare image model]).
MATRIX = {
    "audio-default-conv": (hf_audio, None, {}),
    # a conv stack that differs from the default, an even positional kernel, more positional layers
    "audio-custom-conv": (hf_audio, None, {"conv_dim": [16, 24, 32], "conv_kernel": [8, 4, 3],
                                           "conv_stride": [4, 3, 2], "conv_bias": True, "conv_pos_kernel_size": 4,
                                           "num_conv_pos_embeddings": 4}),
    "audio-relu": (hf_audio, None, {"hidden_act": "relu"}),
    "audio-ctc": (hf_audio, "Data2VecAudioForCTC", {"vocab_size": 12}),
    "audio-seq-cls-weighted": (hf_audio, "Data2VecAudioForSequenceClassification",
                               {"use_weighted_layer_sum": True, "num_labels": 3, "classifier_proj_size": 8}),
    "audio-frame-cls": (hf_audio, "Data2VecAudioForAudioFrameClassification", {"num_labels": 3}),
    "audio-xvector": (hf_audio, "Data2VecAudioForXVector", {"tdnn_dim": [8, 8], "tdnn_kernel": [3, 1],
                                                            "tdnn_dilation": [1, 1], "xvector_output_dim": 8}),
    "image-shared-bias-cls": (hf_image, None, {**SHARED, "use_mean_pooling": False}),
    "image-per-layer-bias-mean-pool": (hf_image, None, {**NO_BIAS, **PER_LAYER, "use_mean_pooling": True}),
    "image-mean-pool-no-pooler": (hf_image, None, {"use_mean_pooling": True, "add_pooling_layer": None}),
    "image-both-biases": (hf_image, None, {**SHARED, **PER_LAYER, "use_mean_pooling": False}),
    "image-no-bias": (hf_image, None, {**NO_BIAS, "use_mean_pooling": False}),
    "image-absolute-positions": (hf_image, None, {**NO_BIAS, "use_absolute_position_embeddings": True}),
    "image-absolute-and-shared": (hf_image, None, {**SHARED, "use_absolute_position_embeddings": True,
                                                   "use_mean_pooling": False}),
    "image-no-layer-scale": (hf_image, None, {"layer_scale_init_value": 0.0}),
    "image-no-mask-token": (hf_image, None, {"use_mask_token": False}),
    "image-gelu-new": (hf_image, None, {"hidden_act": "gelu_new"}),
    "image-classification": (hf_image, "Data2VecVisionForImageClassification",
                             {"num_labels": 5, "use_mean_pooling": True}),
    "image-classification-cls": (hf_image, "Data2VecVisionForImageClassification",
                                 {"num_labels": 5, "use_mean_pooling": False}),
    "image-segmentation": (hf_image, "Data2VecVisionForSemanticSegmentation",
                           {"num_labels": 4, "out_indices": [0, 1, 2, 2], "use_auxiliary_head": True,
                            "auxiliary_channels": 8}),
    "text-type-vocab-1": (hf_text, None, {"type_vocab_size": 1}),
    "text-type-vocab-2": (hf_text, None, {"type_vocab_size": 2}),
    "text-masked-lm": (hf_text, "Data2VecTextForMaskedLM", {}),
    "text-seq-cls": (hf_text, "Data2VecTextForSequenceClassification", {"num_labels": 3, "type_vocab_size": 2}),
    "text-token-cls": (hf_text, "Data2VecTextForTokenClassification", {"num_labels": 3}),
    "text-question-answering": (hf_text, "Data2VecTextForQuestionAnswering", {}),
    "text-multiple-choice": (hf_text, "Data2VecTextForMultipleChoice", {}),
    "text-silu": (hf_text, None, {"hidden_act": "silu"}),
}


@pytest.mark.parametrize("case", list(MATRIX))
def test_import_matches_transformers_item_by_item(tmp_path, case):
    builder, model_class, overrides = MATRIX[case]
    ours, theirs, _ = _import(builder, tmp_path, model_class, **overrides)
    COMPARE[builder](ours, theirs)


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


def test_imported_text_checkpoint_carries_tokenizer(tmp_path):
    from tokenizers import Tokenizer

    _, _, ckpt = _import(hf_text, tmp_path)
    pre = ckpt["preprocessing"]
    assert (pre["bos_id"], pre["pad_id"], pre["eos_id"]) == (0, 1, 2)
    assert pre["max_length"] == 64  # tokenizer_config.json's model_max_length
    ids = Tokenizer.from_str(pre["tokenizer"]).encode("The teacher sees the whole sentence.").ids
    assert ids[0] == 0 and ids[-1] == 2


@pytest.mark.parametrize(("builder", "model_class", "overrides", "expected"), [
    (hf_audio, None, {"add_adapter": True, "output_hidden_size": 32}, "add_adapter=True"),
    (hf_image, None, {"hidden_act": "tanh"}, "hidden_act='tanh'"),
    (hf_text, "Data2VecTextForCausalLM", {"is_decoder": True}, "is_decoder=True"),
], ids=["audio-adapter", "image-tanh", "text-decoder"])
def test_what_d2v_cannot_represent_is_refused_in_one_line(tmp_path, builder, model_class, overrides, expected):
    """The few transformers options that change the computation in ways our encoders do not implement."""
    from d2v.training.import_hf import HFImportError

    hf_dir = builder(tmp_path / "hf", **({"model_class": model_class} if model_class else {}), **overrides)
    with pytest.raises(HFImportError) as e:
        import_hf(hf_dir)
    assert expected in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("conv_bias", [False, True])
def test_audio_channels_last_front_end_computes_the_conv1d_front_end(conv_bias):
    """Export traces the conv feature encoder channels last (each conv one MatMul over gathered frames); eager runs
    Conv1d. Same weights, same frames, for every length from the receptive field up."""
    from d2v.training.models import EncoderConfig, build_encoder

    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig.preset("audio", "tiny", conv_bias=conv_bias)).eval()
    for length in (400, 401, 719, 3201, 16000):
        wave = torch.randn(2, length)
        with torch.no_grad():
            eager = encoder.conv_features(wave)
            encoder.channels_last_front_end = True
            try:
                matmul = encoder.conv_features(wave)
            finally:
                encoder.channels_last_front_end = False
        assert matmul.shape == eager.shape
        assert_close_at_scale(matmul, eager, 1e-5, f"length {length}")


def test_audio_front_end_trains_channels_last_with_conv1d_gradients(monkeypatch):
    """With gradients on (training, CPU) the front end runs the MatMul form, whose backward is ~2x faster than
    Conv1d's; outputs and weight gradients equal the Conv1d blocks'."""
    from d2v.training.models import EncoderConfig, build_encoder
    from d2v.training.models.audio import ConvBlock

    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig.preset("audio", "tiny", conv_bias=True)).train()
    wave = torch.randn(3, 4001)
    weights = [b.conv.weight for b in encoder.feature_extractor] + [b.conv.bias for b in encoder.feature_extractor]
    reference = encoder.conv1d_features(wave)
    expected = torch.autograd.grad(reference.square().sum(), weights)

    def conv1d_used(*_args, **_kwargs):
        raise AssertionError("the Conv1d form ran with gradients on")

    monkeypatch.setattr(ConvBlock, "forward", conv1d_used)
    trained = encoder.conv_features(wave)
    got = torch.autograd.grad(trained.square().sum(), weights)
    assert_close_at_scale(trained, reference, 1e-5, "features")
    # each weight-gradient element sums ~12k float32 products: rounding is relative to the gradient's magnitude
    # (seen: 2e-6 of the largest element; 1.7e-4 absolute once tripped a fixed 1e-4)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert_close_at_scale(g, e, 2e-5, f"gradient {i}")

