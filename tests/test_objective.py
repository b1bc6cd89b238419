from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from d2v.training.config import ScheduleConfig, resolve_config
from d2v.training.models import EncoderConfig, build_encoder
from d2v.training.models.init import init_weights
from d2v.training.objectives.data2vec import Data2Vec, teacher_spec
from d2v.training.objectives.loss import LossSpec, regression_head
from d2v.training.schedules import ema_decay, learning_rate, tri_stage, warmup_cosine
from tests.tolerance import assert_close_at_scale

# what the reference table says each modality's targets are: (layer output, per-layer norm, norm after averaging)
REFERENCE_TARGETS = {"audio": ("ffn", "instance", False), "image": ("block", "layer", True),
                     "text": ("ffn", "layer", False)}
SMALL = dict(hidden_size=32, num_layers=3, num_heads=4, ffn_size=64, target_layers=2)


def make_objective(modality: str, seed: int = 0, **loss_overrides) -> Data2Vec:
    torch.manual_seed(seed)
    extra = {"audio": dict(conv_layers=[[16, 10, 5]] + [[16, 3, 2]] * 4 + [[16, 2, 2]] * 2, pos_conv_layers=2),
             "image": dict(image_size=32, patch_size=8), "text": dict(vocab_size=60, max_positions=40)}[modality]
    cfg = EncoderConfig.preset(modality, "tiny", **SMALL, **extra)
    student = init_weights(build_encoder(cfg))
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "norm" in name or "gamma" in name:
                p.add_(torch.randn_like(p) * 0.2)
    # the values these tests were written against: the short recipe's, text's reference teacher and loss
    cfg = resolve_config(modality, recipe=None if modality == "text" else "short")
    loss = dict(beta=cfg.loss.beta, scale=cfg.loss.scale, reduce=cfg.loss.reduce, head_layers=cfg.loss.head_layers)
    loss.update(loss_overrides)
    return Data2Vec(student, teacher_spec(cfg), LossSpec(**loss))


def make_batch(modality: str, gen: torch.Generator):
    if modality == "audio":
        x = torch.randn(2, 8000, generator=gen)
        attention = torch.ones(2, 8000, dtype=torch.long)
        attention[1, 5000:] = 0
        x[1, 5000:] = 0
        inputs = {"input_values": x, "attention_mask": attention}
        frames = [24, 15]  # conv output frames of 8000 and 5000 samples
        mask = torch.zeros(2, 24, dtype=torch.bool)
        mask[0, 3:13] = mask[1, 2:12] = True
        return inputs, mask, None, frames
    if modality == "image":
        inputs = {"pixel_values": torch.randn(2, 3, 32, 32, generator=gen)}
        mask = torch.zeros(2, 16, dtype=torch.bool)
        mask[0, [0, 1, 4, 5, 6]] = mask[1, [9, 10, 13, 14, 15]] = True
        return inputs, mask, None, [16, 16]
    ids = torch.randint(5, 59, (2, 12), generator=gen)
    ids[:, 0], ids[0, 11], ids[1, 8] = 0, 2, 2
    ids[1, 9:] = 1
    attention = (ids != 1).long()
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, [2, 5, 6]] = mask[1, [1, 4]] = True
    student_ids = ids.clone()
    student_ids[mask] = 59
    return ({"input_ids": ids, "attention_mask": attention}, mask,
            {"input_ids": student_ids, "attention_mask": attention}, [12, 9])


def naive_layer_norm(v: torch.Tensor) -> torch.Tensor:
    mean = sum(v.tolist()) / len(v)
    var = sum((a - mean) ** 2 for a in v.tolist()) / len(v)
    return (v - mean) / math.sqrt(var + 1e-5)


def naive_targets(layers: list[torch.Tensor], valid: list[int], norm: str, final_norm: bool) -> torch.Tensor:
    """Top-K layer outputs -> normalised each (instance norm over valid time per channel, or layer norm per
    position) -> averaged -> optional layer norm. Written with loops, independently of training/targets.py."""
    b, t, d = layers[0].shape
    total = torch.zeros(b, t, d, dtype=torch.float64)
    for x in layers:
        x = x.double()
        y = torch.zeros_like(x)
        for i in range(b):
            if norm == "instance":
                for c in range(d):
                    col = x[i, : valid[i], c]
                    mean = col.sum() / valid[i]
                    var = ((col - mean) ** 2).sum() / valid[i]
                    y[i, : valid[i], c] = (col - mean) / math.sqrt(var + 1e-5)
            else:
                for j in range(t):
                    y[i, j] = naive_layer_norm(x[i, j])
        total += y
    avg = total / len(layers)
    if final_norm:
        for i in range(b):
            for j in range(t):
                avg[i, j] = naive_layer_norm(avg[i, j])
    return avg


def naive_position_loss(p: torch.Tensor, y: torch.Tensor, beta: float, reduce: str) -> float:
    terms = []
    for a, b in zip(p.tolist(), y.tolist(), strict=True):
        diff = abs(a - b)
        if beta == 0:
            terms.append(diff * diff)
        else:
            terms.append(0.5 * diff * diff / beta if diff < beta else diff - 0.5 * beta)
    return sum(terms) if reduce == "sum" else sum(terms) / len(terms)


@pytest.mark.parametrize("modality", ["audio", "image", "text"])
def test_targets_and_loss_match_a_naive_reference(modality):
    obj = make_objective(modality).eval()
    inputs, mask, student_inputs, valid = make_batch(modality, torch.Generator().manual_seed(1))
    out = obj(inputs, mask, student_inputs)

    source, norm, final_norm = REFERENCE_TARGETS[modality]
    k = obj.cfg.target_layers
    with torch.no_grad():
        # at initialisation the teacher equals the student, so the student on the clean input is the teacher
        clean = obj.student(**inputs)
        layers = clean.ffn_outputs[-k:] if source == "ffn" else clean.hidden_states[-k:]
        prefix = 1 if modality == "image" else 0  # the CLS token comes first
        target_valid = [v + prefix for v in valid]
        targets = naive_targets(list(layers), target_valid, norm, final_norm)
        if modality == "text":
            seen = obj.student(**student_inputs).last_hidden_state
        else:
            seen = obj.student(**inputs, mask=mask).last_hidden_state
        spec = obj.loss_spec
        scale = spec.scale if spec.scale is not None else 1 / math.sqrt(obj.cfg.hidden_size)
        total, preds, ys = 0.0, [], []
        for i in range(mask.shape[0]):
            for j in range(mask.shape[1]):
                if mask[i, j]:
                    pred = obj.head(seen[i, j + prefix]).double()
                    y = targets[i, j + prefix]
                    total += naive_position_loss(pred, y, spec.beta, spec.reduce) * scale
                    preds.append(pred)
                    ys.append(y)
        expected = total / len(preds)

    def naive_spread(rows: list[torch.Tensor]) -> float:
        m = torch.stack(rows)
        cols = []
        for c in range(m.shape[1]):
            col = m[:, c]
            mean = col.mean()
            cols.append(math.sqrt(float(((col - mean) ** 2).sum() / (len(col) - 1)) + 1e-6))
        return sum(cols) / len(cols)

    assert out.loss.item() == pytest.approx(expected, rel=1e-4)
    assert out.stats["masked"].item() == len(preds)
    assert out.stats["target_var"].item() == pytest.approx(naive_spread(ys), rel=1e-4)
    assert out.stats["pred_var"].item() == pytest.approx(naive_spread(preds), rel=1e-4)


def test_text_teacher_sees_the_clean_sentence():
    """fairseq issue 4881: the teacher must not see masks or padding in place of the masked tokens."""
    obj = make_objective("text").eval()
    inputs, mask, student_inputs, _ = make_batch("text", torch.Generator().manual_seed(2))
    a = obj(inputs, mask, student_inputs)
    other = dict(student_inputs, input_ids=student_inputs["input_ids"].masked_fill(mask, 7))
    b = obj(inputs, mask, other)
    assert a.stats["target_var"].item() == b.stats["target_var"].item()  # targets do not depend on the student view
    assert a.loss.item() != b.loss.item()


def test_gradients_reach_student_and_head_but_not_teacher():
    obj = make_objective("audio").train()
    inputs, mask, _, _ = make_batch("audio", torch.Generator().manual_seed(3))
    obj(inputs, mask).loss.backward()
    assert all(p.grad is None for p in obj.teacher.parameters())
    assert obj.student.mask_embedding.grad is not None and obj.student.mask_embedding.grad.abs().sum() > 0
    assert obj.student.feature_extractor[0].conv.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in obj.head.parameters())
    assert not obj.teacher.model.training  # the teacher stays in eval mode


def test_teacher_parts_per_modality():
    audio = set(make_objective("audio").teacher.model.state_dict())
    assert not any(k.startswith(("feature_extractor", "feature_projection", "mask_embedding")) for k in audio)
    assert any(k.startswith("pos_conv") for k in audio) and any(k.startswith("transformer") for k in audio)
    image = make_objective("image")
    assert set(image.teacher.model.state_dict()) == set(image.student.state_dict())


@pytest.mark.parametrize("modality", ["audio", "image", "text"])
def test_ema_update_averages_and_copies_the_shared_parts(modality):
    obj = make_objective(modality)
    before = {k: v.clone() for k, v in obj.teacher.model.state_dict().items()}
    with torch.no_grad():
        for p in obj.student.parameters():
            p.add_(torch.randn_like(p))
    obj.update_teacher(0.9)
    student = dict(obj.student.named_parameters())
    copied = {"audio": ("pos_conv.",), "image": (), "text": ("token_embed.", "position_embed.", "token_type_embed.",
                                                              "embed_norm.")}[modality]
    for name, p in obj.teacher.model.named_parameters():
        if name.startswith(copied):
            assert torch.equal(p, student[name])
        else:
            assert torch.allclose(p, 0.9 * before[name] + 0.1 * student[name], atol=1e-6)
            assert not p.requires_grad


def test_ema_decay_schedule_values():
    assert ema_decay(0, 0.999, 0.9999, 30000) == pytest.approx(0.999)
    assert ema_decay(15000, 0.999, 0.9999, 30000) == pytest.approx(0.99945)
    assert ema_decay(30000, 0.999, 0.9999, 30000) == 0.9999
    assert ema_decay(10**6, 0.999, 0.9999, 30000) == 0.9999
    assert ema_decay(5, 0.9998, 0.9998, 0) == 0.9998  # image: constant
    values = [ema_decay(t, 0.999, 0.9999, 100) for t in range(101)]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))


def test_lr_schedules():
    assert warmup_cosine(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 1.0, 10, 0.0) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    phases = [0.03, 0.90, 0.07]
    assert tri_stage(0, 1000, 1.0, phases) == pytest.approx(0.01)
    assert tri_stage(500, 1000, 1.0, phases) == 1.0
    assert tri_stage(1000, 1000, 1.0, phases, final_scale=0.05) == pytest.approx(0.05)
    assert learning_rate(500, 1000, 5e-4, ScheduleConfig(name="tri_stage")) == pytest.approx(5e-4)
    assert learning_rate(0, 1000, 1.0, ScheduleConfig(name="cosine", warmup_steps=10)) == pytest.approx(0.1)


def test_regression_heads():
    assert isinstance(regression_head(16, 1), nn.Linear)
    mlp = regression_head(16, 2)
    shapes = [tuple(m.weight.shape) for m in mlp if isinstance(m, nn.Linear)]
    assert shapes == [(32, 16), (16, 32)] and isinstance(mlp[1], nn.GELU)


def test_default_loss_scale_is_one_over_sqrt_dim():
    obj = make_objective("audio", scale=None).eval()
    inputs, mask, _, _ = make_batch("audio", torch.Generator().manual_seed(4))
    unscaled = make_objective("audio", scale=1.0).eval()(inputs, mask).loss
    assert obj(inputs, mask).loss.item() == pytest.approx(unscaled.item() / math.sqrt(32), rel=1e-5)


@pytest.mark.parametrize("modality", ["audio", "image", "text"])
def test_document_head_input_is_the_mean_of_the_visible_outputs(modality):
    """head_input="document": each masked position's head input is the mean of the student's outputs at the other
    (visible, non-padded) positions of its item, written here as a loop."""
    obj = make_objective(modality, head_input="document").eval()
    inputs, mask, student_inputs, frames = make_batch(modality, torch.Generator().manual_seed(3))
    x, valid = obj.student.embed(**(student_inputs or inputs))
    if obj.spec.mask_param is not None:
        x = torch.where(mask.unsqueeze(-1), getattr(obj.student, obj.spec.mask_param), x)
    h = obj.student.encode(x, valid).last_hidden_state
    h = h[:, h.shape[1] - mask.shape[1]:]
    rows = obj.head_inputs(h, mask, valid)
    expected = []
    for i in range(mask.shape[0]):
        seen = [h[i, j] for j in range(frames[i]) if not mask[i, j]]
        mean = sum(seen) / len(seen)
        expected += [mean] * int(mask[i].sum())
    assert_close_at_scale(rows, torch.stack(expected), 1e-5, "document rows")  # two summation orders
    loss = obj(inputs, mask, student_inputs).loss
    loss.backward()
    assert torch.isfinite(loss) and obj.student.transformer.layers[0].attn.v.weight.grad.abs().sum() > 0


def test_head_input_must_be_known():
    with pytest.raises(ValueError, match="head_input must be one of position, document"):
        make_objective("text", head_input="cls")
