"""d2v-export: every modality exports, verifies and describes itself; variants hold their promises; failures leave
no file. Exports are shared per module (each costs seconds), checks on them are cheap."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from d2v.export import export_model
from d2v.export import verify as V
from d2v.export.graph import graph_module
from d2v.export.pipeline import TOLERANCE_ENV
from d2v.export.variants import FUSED_OPS
from d2v.training.checkpoint import encoder_config, load_checkpoint, load_encoder, save_checkpoint
from d2v.training.import_hf import import_hf
from d2v_serve.models.model_file import read_metadata
from d2v_serve.preprocess import audio_frames, preprocessing_from_dict
from tests.factories import write_tiny_checkpoint
from tests.hf_models import hf_audio, hf_image

MODALITIES = ("audio", "image", "text")
CONTRACT_KEYS = {"format", "format_version", "modality", "hidden_size", "num_layers", "num_heads", "inputs",
                 "outputs", "precision", "preprocessing", "representations", "target_layers", "source", "exporter",
                 "parity"}
EXTRA_KEYS = {"audio": {"conv_layers", "conv_stride", "receptive_field"}, "image": {"image_size", "patch_size"},
              "text": {"max_positions"}}
INPUTS = {"audio": ["input_values", "attention_mask"], "image": ["pixel_values"],
          "text": ["input_ids", "attention_mask"]}
OUTPUTS = ["last_hidden_state", "target_hidden_state", "output_mask"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def checkpoints(workdir: Path) -> dict[str, Path]:
    return {m: write_tiny_checkpoint(m, workdir / "ckpt") for m in MODALITIES}


@pytest.fixture(scope="module")
def fp32(workdir: Path, checkpoints: dict[str, Path]) -> dict[str, dict]:
    return {m: export_model(checkpoints[m], workdir / "fp32" / f"{m}.onnx") for m in MODALITIES}


@pytest.fixture(scope="module")
def int8(workdir: Path, checkpoints: dict[str, Path]) -> dict[str, dict]:
    return {m: export_model(checkpoints[m], workdir / "int8" / f"{m}.onnx", int8=True) for m in MODALITIES}


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The installed console script's entry point, run as its own process."""
    script = "import sys; from d2v.export.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", script, *args],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
                          cwd=Path(__file__).resolve().parents[1])


def _torch_outputs(ckpt_path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ckpt = load_checkpoint(ckpt_path)
    module = graph_module(load_encoder(ckpt), encoder_config(ckpt))
    return V.torch_reference(module, [inputs])[0]


def _unseen_inputs(modality: str, ckpt_path: Path) -> dict[str, np.ndarray]:
    """Batch 5 with lengths the export never saw."""
    rng = np.random.default_rng(7)
    cfg = encoder_config(load_checkpoint(ckpt_path))
    if modality == "image":
        return {"pixel_values": rng.standard_normal((5, 3, cfg.image_size, cfg.image_size)).astype(np.float32)}
    lengths = [9001, 4321, 777, 12345, 2500] if modality == "audio" else [7, 29, 2, 40, 13]
    values = np.zeros((5, max(lengths)), np.float32) if modality == "audio" else np.ones((5, max(lengths)), np.int64)
    mask = np.zeros((5, max(lengths)), np.int64)
    for i, n in enumerate(lengths):
        values[i, :n] = rng.standard_normal(n) if modality == "audio" else rng.integers(3, cfg.vocab_size, n)
        mask[i, :n] = 1
    return {INPUTS[modality][0]: values, "attention_mask": mask}


# ---- fp32: graph, parity, metadata ----------------------------------------------------------------------------


@pytest.mark.parametrize("modality", MODALITIES)
def test_fp32_export_verifies_with_contract_graph(fp32, modality):
    report = fp32[modality]
    path = Path(report["path"])
    assert path.is_file() and report["size_bytes"] == path.stat().st_size
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(".")) == []  # no temp files left
    parity = report["parity"]["fp32"]
    assert max(parity["max_abs_diff"].values()) <= 1e-4 and parity["output_mask_equal"]
    assert len(report["parity"]["shapes"]) >= 3 and [1] == report["parity"]["shapes"][0][:1]
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == INPUTS[modality]
    assert [o.name for o in sess.get_outputs()] == OUTPUTS
    types = {v.name: v.type for v in [*sess.get_inputs(), *sess.get_outputs()]}
    assert types["last_hidden_state"] == types["target_hidden_state"] == "tensor(float)"
    assert types["output_mask"] == "tensor(int64)"
    assert types.get("attention_mask", "tensor(int64)") == "tensor(int64)"
    for value in [*sess.get_inputs(), *sess.get_outputs()]:
        assert value.shape[0] == "batch"
        if modality != "image":
            assert isinstance(value.shape[1], str)  # a named dynamic length axis


@pytest.mark.parametrize("modality", MODALITIES)
def test_dynamic_axes_take_unseen_batch_and_lengths(fp32, checkpoints, modality):
    inputs = _unseen_inputs(modality, checkpoints[modality])
    sess = ort.InferenceSession(fp32[modality]["path"], providers=["CPUExecutionProvider"])
    got = V.run(sess, [inputs])
    ref = _torch_outputs(checkpoints[modality], inputs)
    result = V.compare([ref], got, pooled_target=modality != "audio")
    assert max(result["max_abs_diff"].values()) <= 1e-4 and result["output_mask_equal"], result
    if modality == "audio":
        conv = encoder_config(load_checkpoint(checkpoints[modality])).conv_layers
        frames = [audio_frames(int(n), conv) for n in inputs["attention_mask"].sum(1)]
        assert got[0]["output_mask"].sum(1).tolist() == frames


@pytest.mark.parametrize("modality", MODALITIES)
def test_metadata_complete_and_round_trips(fp32, checkpoints, modality):
    meta = read_metadata(fp32[modality]["path"]).to_dict()  # the server's reader
    assert set(meta) == CONTRACT_KEYS | EXTRA_KEYS[modality]
    ckpt = load_checkpoint(checkpoints[modality])
    cfg = encoder_config(ckpt)
    assert meta["format"] == "d2v-onnx" and meta["format_version"] == 2 and meta["modality"] == modality
    assert (meta["hidden_size"], meta["num_layers"], meta["num_heads"]) == (cfg.hidden_size, cfg.num_layers,
                                                                             cfg.num_heads)
    assert meta["inputs"] == INPUTS[modality] and meta["outputs"] == OUTPUTS and meta["precision"] == "fp32"
    assert meta["preprocessing"] == ckpt["preprocessing"]
    preprocessing_from_dict(modality, meta["preprocessing"])  # serving can build its preprocessing from it
    assert meta["target_layers"] == cfg.target_layers
    target_poolings = ["none"] if modality == "audio" else ["mean", "cls", "none"]  # audio: instance norm over time
    assert meta["representations"] == {"last": {"output": "last_hidden_state", "poolings": ["mean", "cls", "none"]},
                                       "target": {"output": "target_hidden_state", "poolings": target_poolings}}
    if modality == "audio":
        assert meta["conv_layers"] == cfg.conv_layers
        assert (meta["conv_stride"], meta["receptive_field"]) == (320, 400)  # wav2vec 2.0's front end
    elif modality == "image":
        assert (meta["image_size"], meta["patch_size"]) == (cfg.image_size, cfg.patch_size)
    else:
        assert meta["max_positions"] == min(ckpt["preprocessing"]["max_length"], cfg.max_positions - cfg.pad_id - 1)
        tok = preprocessing_from_dict("text", meta["preprocessing"])
        ids = tok.prepare("The teacher sees the whole sentence.")
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    digest = hashlib.sha256(checkpoints[modality].read_bytes()).hexdigest()
    assert meta["source"] == {"checkpoint_sha256": digest, "checkpoint": checkpoints[modality].name}
    assert set(meta["exporter"]) == {"d2v", "torch", "onnx", "onnxruntime", "opset"}
    assert meta["exporter"]["torch"] == torch.__version__ and meta["exporter"]["opset"] >= 17
    assert meta["parity"]["fp32"]["output_mask_equal"] is True
    raw = next(p.value for p in onnx.load(fp32[modality]["path"]).metadata_props if p.key == "d2v")
    assert json.loads(raw) == meta


# ---- int8 -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("modality", MODALITIES)
def test_int8_quantizes_matmuls_and_stays_close(int8, checkpoints, modality):
    report = int8[modality]
    meta = read_metadata(report["path"]).to_dict()
    assert meta["precision"] == "int8" and report["parity"]["int8"]["cosine"] >= 0.99
    ops = {n.op_type for n in onnx.load(report["path"]).graph.node}
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops and not ops & {"ConvInteger", "MatMul"}
    inputs = _unseen_inputs(modality, checkpoints[modality])
    got = V.run(ort.InferenceSession(report["path"], providers=["CPUExecutionProvider"]), [inputs])
    result = V.compare([_torch_outputs(checkpoints[modality], inputs)], got, pooled_target=modality != "audio")
    assert result["cosine"] >= 0.99 and result["output_mask_equal"], result


# ---- published (transformers) models ----------------------------------------------------------------------------


@pytest.mark.parametrize(("builder", "overrides"), [
    (hf_audio, {}), (hf_image, {}),
    # the optional image pieces in the graph: absolute positions, shared + per-layer bias, no layer scale, tanh GELU
    (hf_image, {"use_absolute_position_embeddings": True, "use_relative_position_bias": True,
                "layer_scale_init_value": 0.0, "hidden_act": "gelu_new"}),
], ids=["audio", "image", "image-options"])
def test_imported_transformers_model_exports(tmp_path, builder, overrides):
    import transformers as T

    hf_dir = builder(tmp_path / "hf", **overrides)
    ckpt, _ = import_hf(hf_dir)
    ckpt_path = save_checkpoint(tmp_path / "imported.pt", ckpt)
    report = export_model(ckpt_path, tmp_path / "imported.onnx")
    assert max(report["parity"]["fp32"]["max_abs_diff"].values()) <= 1e-4
    meta = read_metadata(report["path"]).to_dict()
    assert meta["source"]["imported"]["kind"] == "transformers" and meta["preprocessing"] == ckpt["preprocessing"]
    # the file computes what transformers computes for the published model
    kwargs = {"add_pooling_layer": True} if builder is hf_image else {}
    theirs = T.AutoModel.from_pretrained(hf_dir, **kwargs).eval()  # a local directory, never a hub id
    rng = np.random.default_rng(3)
    if builder is hf_audio:
        x = rng.standard_normal((1, 5000)).astype(np.float32)
        inputs = {"input_values": x, "attention_mask": np.ones_like(x, dtype=np.int64)}
        with torch.no_grad():
            expected = theirs(torch.from_numpy(x)).last_hidden_state.numpy()
    else:
        size = meta["image_size"]
        x = rng.standard_normal((1, 3, size, size)).astype(np.float32)
        inputs = {"pixel_values": x}
        with torch.no_grad():
            expected = theirs(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    got = ort.InferenceSession(report["path"], providers=["CPUExecutionProvider"]).run(None, inputs)[0]
    assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-4


# ---- CLI: determinism, summary, failures ------------------------------------------------------------------------


def test_cli_export_is_byte_identical_to_api_export(fp32, checkpoints, tmp_path):
    out = tmp_path / "text.onnx"
    proc = _cli(str(checkpoints["text"]), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "MB" in lines[0] and "max diff" in lines[0] and "cosine" in lines[0]
    assert "d2v-export: exporting" in proc.stderr  # progress goes to stderr
    assert out.read_bytes() == Path(fp32["text"]["path"]).read_bytes()  # another process, another path: same file


@pytest.mark.parametrize("kind", ["missing", "truncated", "foreign"])
def test_broken_checkpoint_exits_1_with_one_line_and_no_file(checkpoints, tmp_path, kind):
    ckpt = tmp_path / "broken.pt"
    if kind == "truncated":
        data = checkpoints["text"].read_bytes()
        ckpt.write_bytes(data[: len(data) // 2])
    elif kind == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, ckpt)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = _cli(str(ckpt), "-o", str(out_dir / "model.onnx"))
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("d2v-export: error:")]
    assert len(errors) == 1 and str(ckpt) in errors[0]
    assert proc.stdout == "" and list(out_dir.iterdir()) == []


def test_forced_parity_failure_exits_nonzero_with_figures_and_no_file(checkpoints, tmp_path):
    out = tmp_path / "model.onnx"
    proc = _cli(str(checkpoints["text"]), "-o", str(out), "--tolerance", "0")
    assert proc.returncode == 3
    assert "parity check failed (fp32)" in proc.stderr and "max abs diff" in proc.stderr
    assert "no file written" in proc.stderr and list(tmp_path.iterdir()) == []


def test_tolerance_env_var_fails_the_api_export(checkpoints, tmp_path, monkeypatch):
    from d2v.export import ParityError

    monkeypatch.setenv(TOLERANCE_ENV, "0")
    with pytest.raises(ParityError, match=r"max abs diff \S+ > tolerance 0"):
        export_model(checkpoints["image"], tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


# ---- fp16 and fusions ----------------------------------------------------------------------------------------


def test_fp16_graph_is_checked_and_long_audio_keeps_exact_frame_counts(checkpoints, tmp_path):
    report = export_model(checkpoints["audio"], tmp_path / "audio-fp16.onnx", fp16=True)
    model = onnx.load(report["path"])
    onnx.checker.check_model(model)
    meta = read_metadata(report["path"]).to_dict()
    assert meta["precision"] == "fp16"
    fp16 = meta["parity"]["fp16"]
    assert fp16["graph"] == "ok" and fp16["checked_on"]
    for label in fp16["checked_on"]:
        assert fp16[label]["cosine"] >= 0.999 and fp16[label]["output_mask_equal"]
    if "cuda" not in fp16["checked_on"]:  # no GPU: the report and the summary say so
        assert fp16["cuda"].startswith("not checked") and "not checked on GPU" in report["summary"]
    for value in [*model.graph.input, *model.graph.output]:  # keep_io_types
        assert value.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.INT64)
    matmul_weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
    weights = [i for i in model.graph.initializer if i.name in matmul_weights]
    assert weights and all(i.data_type == TensorProto.FLOAT16 for i in weights)
    # frame counts are integer arithmetic done in floats: float16 would lose them past 2048 samples
    sess = ort.InferenceSession(report["path"], providers=["CPUExecutionProvider"])
    n = 50_021
    x = np.random.default_rng(0).standard_normal((2, n)).astype(np.float32)
    mask = np.ones((2, n), np.int64)
    mask[1, 33_333:] = 0
    out = dict(zip(OUTPUTS, sess.run(None, {"input_values": x, "attention_mask": mask}), strict=True))
    conv = meta["conv_layers"]
    assert out["output_mask"].sum(1).tolist() == [audio_frames(n, conv), audio_frames(33_333, conv)]
    assert np.isfinite(out["target_hidden_state"]).all()


@pytest.mark.parametrize("modality", MODALITIES)
def test_fused_graph_runs_contrib_attention_gelu_and_skip_norm(fp32, int8, checkpoints, modality):
    layers = encoder_config(load_checkpoint(checkpoints[modality])).num_layers
    # int8: QAttention where attention's bias is only the padding mask; the image's relative position bias needs
    # MultiHeadAttention's bias input
    int8_attention = "MultiHeadAttention" if modality == "image" else "QAttention"
    for report, attention in ((fp32[modality], "Attention"), (int8[modality], int8_attention)):
        counts = report["parity"]["fused_nodes"]
        assert report["parity"]["graph"] == "fused" and set(FUSED_OPS) <= set(counts["in_file"])
        assert counts["in_file"][attention] == layers and counts["in_file"]["BiasGelu"] == layers
        assert sum(counts["in_file"][op] for op in ("Attention", "MultiHeadAttention", "QAttention")) == layers
        assert counts["in_file"]["SkipLayerNormalization"] >= 2 * layers
        in_file = {n.op_type for n in onnx.load(report["path"]).graph.node}
        assert not in_file & {"Softmax", "Erf"}  # no attention or GELU left unfused
        session = counts["onnxruntime_cpu"]
        assert session[attention] == layers and session["SkipLayerNormalization"] >= 2 * layers, session
        assert read_metadata(report["path"]).parity["fused_nodes"] == counts  # recorded in the file
        assert "fused" in report["summary"]


@pytest.mark.parametrize("modality", MODALITIES)
def test_fused_graph_is_batch_invariant(fp32, checkpoints, modality):
    """An item's output does not depend on its batch-mates or on the padding they bring."""
    batch = _unseen_inputs(modality, checkpoints[modality])
    sess = ort.InferenceSession(fp32[modality]["path"], providers=["CPUExecutionProvider"])
    together = V.run(sess, [batch])[0]
    for i in range(len(next(iter(batch.values())))):
        n = int(batch["attention_mask"][i].sum()) if "attention_mask" in batch else None
        alone = V.run(sess, [{k: v[i:i + 1, :n] for k, v in batch.items()}])[0]
        valid = alone["output_mask"][0].astype(bool)
        t = valid.size
        assert together["output_mask"][i, :t].tolist() == alone["output_mask"][0].tolist()
        for name in ("last_hidden_state", "target_hidden_state"):
            np.testing.assert_allclose(together[name][i, :t][valid], alone[name][0][valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("modality", ["audio", "text"])
def test_key_mask_attention_equals_the_fused_graph_and_is_batch_invariant(fp32, checkpoints, modality):
    """The padding mask handed to Attention as a [B, T] key mask (QAttention's form, before quantization) computes
    what the additive-bias graph computes, and an item's output does not depend on its batch-mates' padding."""
    from d2v.export.variants import attention_with_key_mask

    model = onnx.load(fp32[modality]["path"])
    layers = encoder_config(load_checkpoint(checkpoints[modality])).num_layers
    keyed = attention_with_key_mask(model)
    attention = [n for n in keyed.graph.node if n.op_type == "Attention"]
    assert len(attention) == layers and all(len(n.input) == 4 and n.input[3] for n in attention)
    assert len({n.input[3] for n in attention}) == 1  # one cast mask shared by every layer
    assert not {n.op_type for n in keyed.graph.node} & {"Where", "Expand"}  # the additive-bias subgraph is gone
    batch = _unseen_inputs(modality, checkpoints[modality])
    sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (model, keyed)]
    biased, together = (V.run(s, [batch])[0] for s in sessions)
    for name in OUTPUTS:
        np.testing.assert_allclose(together[name], biased[name], atol=1e-5, rtol=0)
    for i in range(len(batch["attention_mask"])):
        n = int(batch["attention_mask"][i].sum())
        alone = V.run(sessions[1], [{k: v[i:i + 1, :n] for k, v in batch.items()}])[0]
        valid = alone["output_mask"][0].astype(bool)
        np.testing.assert_allclose(together["last_hidden_state"][i, :valid.size][valid],
                                   alone["last_hidden_state"][0][valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("modality", ["audio", "text"])
def test_int8_qattention_masks_padding(int8, checkpoints, modality):
    """QAttention takes the padding mask: an item inside a padded batch of mixed lengths stays close to the item run
    alone (dynamic quantization scales activations over the whole batch, so close, not equal), and close to torch."""
    sess = ort.InferenceSession(int8[modality]["path"], providers=["CPUExecutionProvider"])
    batch = _unseen_inputs(modality, checkpoints[modality])
    together = V.run(sess, [batch])[0]
    reference = _torch_outputs(checkpoints[modality], batch)
    for i in range(len(batch["attention_mask"])):
        n = int(batch["attention_mask"][i].sum())
        alone = V.run(sess, [{k: v[i:i + 1, :n] for k, v in batch.items()}])[0]
        valid = alone["output_mask"][0].astype(bool)
        pooled = [out["last_hidden_state"][row, :valid.size][valid].mean(0)
                  for out, row in ((together, i), (alone, 0), (reference, i))]
        cosine = [float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in ((pooled[0], pooled[1]),
                                                                                  (pooled[0], pooled[2]))]
        assert cosine[0] >= 0.999 and cosine[1] >= 0.99, (i, cosine)


def test_no_fuse_exports_the_plain_graph(checkpoints, tmp_path):
    report = export_model(checkpoints["text"], tmp_path / "plain.onnx", fuse=False)
    assert report["parity"]["graph"] == "plain" and "unfused" in report["summary"]
    assert not any(n.domain for n in onnx.load(report["path"]).graph.node)
    assert not any(report["parity"]["fused_nodes"]["in_file"].values())


def test_opset_below_dynamo_minimum_is_refused_before_any_work(checkpoints, tmp_path):
    from d2v.export import ExportError

    with pytest.raises(ExportError, match="opset 17 is below 18"):
        export_model(checkpoints["text"], tmp_path / "model.onnx", opset=17)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("weight", ["packed-qkv", "conv-kernel"])
def test_constant_weight_becomes_one_initializer_that_int8_quantizes(weight):
    """Above onnxscript's folding limit a MatMul weight can stay an op on initializers: the packed QKV weight (a
    Concat of three) and the audio front end's conv kernel in MatMul form (a Reshape of the permuted kernel). Export
    stores each as one initializer, so the quantizer sees a constant weight (it would stay float32)."""
    from onnx import helper, numpy_helper

    from d2v.export.variants import _fold_weight_constants, to_int8

    rng = np.random.default_rng(0)
    if weight == "packed-qkv":
        inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), n) for n in "qkv"]
        node = helper.make_node("Concat", ["q", "k", "v"], ["w"], axis=1)
    else:  # [kernel, C_in, C_out] -> [kernel * C_in, C_out]
        inits = [numpy_helper.from_array(rng.standard_normal((3, 8, 24)).astype(np.float32), "kernel"),
                 numpy_helper.from_array(np.array([24, 24], np.int64), "shape")]
        node = helper.make_node("Reshape", ["kernel", "shape"], ["w"], allowzero=1)
    x_width = 8 if weight == "packed-qkv" else 24
    graph = helper.make_graph(
        [node, helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", x_width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 24])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    x = rng.standard_normal((3, x_width)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    _fold_weight_constants(model)
    assert [n.op_type for n in model.graph.node] == ["MatMul"]
    assert [i.name for i in model.graph.initializer] == ["w"]
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(before[0], after[0])
    assert "MatMul" not in {n.op_type for n in to_int8(model).graph.node}
