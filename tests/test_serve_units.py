"""Serving pieces on their own: batch selection, model-file metadata, configuration, tensors, stub generation."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from d2v_serve._proto.d2v.v1 import embedder_pb2 as pb
from d2v_serve.client import sniff
from d2v_serve.config import ServerConfig, parse_config
from d2v_serve.core.batcher import Batcher, BatchPolicy, Item
from d2v_serve.core.postprocess import COMPACT, DTYPES, POOLINGS, OutputOptions
from d2v_serve.errors import ServeError
from d2v_serve.models.model_file import ModelFileError, ModelFileMeta, read_metadata
from d2v_serve.transport.tensors import from_tensor, to_tensor
from tests.serve_fixtures import encode_audio, encode_image, make_tiny_model, picture, tone

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


# ---- batch formation ----------------------------------------------------------------------------------------


class _NoRunner:
    output_names = ["last_hidden_state", "output_mask"]


def _items(lengths: list[int], deadline: float | None = None) -> list[Item]:
    return [Item(np.zeros(n, np.int64), n, "last_hidden_state", lambda h: h, deadline) for n in lengths]


def _batcher(lengths: list[int], **policy: float) -> Batcher:
    b = Batcher("m", "text", _NoRunner(), BatchPolicy(**{"max_delay_s": 0.0, "max_padding": 0.5, **policy}))
    b.reserve(len(lengths))
    b.submit(_items(lengths))
    return b


def _take(b: Batcher) -> list[int]:
    batch = b._select()
    b._remove(batch)
    return sorted(it.length for it in batch)


def test_select_groups_similar_lengths_and_always_takes_the_oldest() -> None:
    b = _batcher([10, 500, 12, 11, 490, 13], max_batch_size=8, budget=1200)
    assert _take(b) == [10, 11, 12, 13]  # the long ones would cost 5 x 490 > 1200
    assert _take(b) == [490, 500]
    assert b.depth == 0 and b._queued_cost == 0


def test_select_respects_batch_size_and_budget() -> None:
    b = _batcher([50, 10, 12, 48, 11], max_batch_size=3, budget=10_000, max_padding=0.9)
    assert _take(b) == [12, 48, 50]  # the oldest (50) and its nearest neighbours by length
    b = _batcher([100, 100, 100, 100], budget=250)
    assert _take(b) == [100, 100]
    b = _batcher([5000, 10], budget=1000)  # one input over the budget still runs, alone
    assert _take(b) == [5000]


def test_select_only_looks_within_the_sort_window() -> None:
    b = _batcher([10, 300, 300, 11], max_batch_size=8, budget=10_000, sort_window=3, max_padding=0.99)
    assert _take(b) == [10, 300, 300]


def test_the_length_index_holds_exactly_the_queue_through_takes_and_drops() -> None:
    b = _batcher([30, 10, 20, 10, 40, 20, 10], max_batch_size=2, budget=10_000, max_padding=0.9, sort_window=4)
    b.reserve(2)
    late = _items([15, 25], deadline=time.monotonic() - 1)
    b.submit(late)
    b._drop_expired(time.monotonic())
    while b._queue:
        assert [e[2] for e in b._by_length] == sorted(b._queue, key=lambda it: (it.length, it.seq))
        _take(b)
    assert b._by_length == [] and b.depth == 0


def test_padding_cap_holds_for_every_batch_and_the_oldest_is_always_served() -> None:
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(8_000, 160_000, size=300)]  # 0.5-10 s of 16 kHz audio
    policy = dict(max_batch_size=64, budget=240 * 16000, max_padding=0.1, attention_length=6 * 768 * 320)
    b = _batcher(lengths, **policy)
    sizes = []
    while b._queue:
        oldest = b._queue[0]
        batch = b._select()
        assert oldest in batch
        got = [it.length for it in batch]
        p = b.policy
        assert p.padding(len(got), max(got), sum(p.work(n) for n in got)) <= 0.1 + 1e-9
        positions = 1 - sum(got) / (len(got) * max(got))  # what the server's padded-fraction metric counts
        assert positions <= 0.1 + 1e-9
        b._remove(batch)
        sizes.append(len(batch))
    assert max(sizes) > 4  # the cap still lets close neighbours batch together


def test_long_inputs_are_not_starved_by_a_stream_of_short_ones() -> None:
    b = _batcher([20] * 8 + [400] + [20] * 8, max_batch_size=4, budget=10_000, max_padding=0.1)
    batches = []
    while len(batches) < 10 and [400] not in batches:
        batches.append(_take(b))
        b.reserve(4)
        b.submit(_items([20] * 4))  # short inputs keep arriving as fast as they are served
    assert batches == [[20] * 4, [20] * 4, [400]]  # served as soon as it is the oldest, alone (padding cap)


def test_cost_counts_attention_and_the_fill_target_stops_growth() -> None:
    p = BatchPolicy(attention_length=1000)
    assert p.work(100) == pytest.approx(110) and p.work(1000) == pytest.approx(2000)
    assert p.cost(4, 1000) == pytest.approx(8000)
    b = _batcher([100] * 10, max_batch_size=64, budget=10_000, fill=450)
    assert _take(b) == [100] * 4  # 5 x 100 > 450


def test_deadlines_are_dropped_at_dequeue() -> None:
    b = _batcher([10])
    b.reserve(1)
    late = _items([10], deadline=time.monotonic() - 1)[0]
    b.submit([late])
    batch = b._next_batch()
    assert [it.length for it in batch] == [10] and late not in batch
    with pytest.raises(ServeError, match="deadline passed"):
        late.future.result(0)
    assert b.depth == 0


def test_a_batch_waits_only_for_inputs_on_their_way() -> None:
    b = _batcher([12] * 4, max_batch_size=16, budget=10_000, max_delay_s=0.002)
    now = b._queue[0].enqueued
    assert b._wait_for_more(now) == 0  # nothing expected (a lone client, open loop): run now
    b._returning, b._free_since = 12, now + 0.001  # the last batch answered 12 closed-loop clients
    assert b._wait_for_more(now + 0.001) == pytest.approx(0.002)  # a full batch's worth comes back: wait
    b.reserve(12)  # they arrive (admitted, being preprocessed): still on their way
    assert b._returning == 0 and b._wait_for_more(now + 0.002) > 0
    assert b._wait_for_more(now + 0.0031) == 0  # the delay is over: run what there is
    b.submit(_items([12] * 12))
    assert b._wait_for_more(now + 0.002) == 0  # the queue holds a full batch (max_batch_size)
    b._remove(b._queue[4:])
    b._returning = 3
    assert b._wait_for_more(now + 0.01) == 0 and b._returning == 0  # late: they are no longer expected
    b._returning = 8
    b.policy.fill = 5 * 12
    assert b._wait_for_more(now + 0.001) > 0  # 4 queued, a fifth would fit the fill target
    b.reserve(1)
    b.submit(_items([12]))
    assert b._wait_for_more(now + 0.001) == 0  # full: a sixth would not fit
    b.policy.fill = 0
    b.policy.max_padding, b.state = 0.1, "closing"
    assert b._wait_for_more(now + 0.001) == 0  # draining: no waiting


def _meta(modality: str, hidden_size: int, num_layers: int, **facts: object) -> ModelFileMeta:
    return ModelFileMeta(modality=modality, hidden_size=hidden_size, num_layers=num_layers, num_heads=4,
                         precision="fp32", preprocessing={}, representations={}, **facts)


def test_policy_fills_small_batches_of_big_models_on_cpu_and_to_the_budget_on_cuda() -> None:
    from d2v_serve.models.registry import batch_policy
    from d2v_serve.preprocess import AudioPreprocessing, conv_stride

    base_text = _meta("text", 768, 12)
    cpu = batch_policy(ServerConfig(), base_text, None, 512, on_cuda=False)
    assert 200 <= cpu.fill <= 260 and cpu.limit == cpu.fill and cpu.max_padding == 0.1
    assert cpu.attention_length == 6 * 768  # attention's work equals the rest at 4608 tokens
    cuda = batch_policy(ServerConfig(), base_text, None, 512, on_cuda=True)
    assert cuda.fill == 0 and cuda.limit == cuda.budget == ServerConfig().max_batch_tokens
    tiny = batch_policy(ServerConfig(), _meta("text", 64, 4), None, 512, False)
    assert tiny.limit == tiny.budget  # an overhead-bound model batches as much as it may
    conv = [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2  # strides multiply to 320 samples per frame
    audio = _meta("audio", 768, 12, conv_layers=conv, conv_stride=conv_stride(conv))
    policy = batch_policy(ServerConfig(max_padding=0.2), audio, AudioPreprocessing(), 0, on_cuda=False)
    assert 200 * 320 <= policy.fill <= 260 * 320 and policy.max_padding == 0.2  # samples: 320 per frame
    # images cost pixels: a patch of 8 is a quarter of the pixels per position of a patch of 16
    by_patch = {p: batch_policy(ServerConfig(), _meta("image", 768, 12, image_size=224, patch_size=p), None, 0,
                                on_cuda=False) for p in (8, 16)}
    assert by_patch[16].fill == pytest.approx(4 * by_patch[8].fill, abs=4)  # whole pixels
    assert by_patch[16].attention_length == 4 * by_patch[8].attention_length


def test_a_batch_is_pooled_as_each_input_alone() -> None:
    rng = np.random.default_rng(0)
    positions = np.array([5, 1, 7, 3])
    hidden = rng.standard_normal((4, 7, 16)).astype(np.float32)
    hidden[np.arange(7)[None, :] >= positions[:, None]] = 1e6  # padding never leaks into a result
    for pooling in POOLINGS:
        for normalize in (False, True):
            for dtype in (DTYPES["float32"], DTYPES["float16"]):  # compact dtypes: below
                options = OutputOptions("last_hidden_state", pooling, normalize, dtype)
                batch = options.finish_batch(hidden, positions)
                for i, n in enumerate(positions):
                    alone = options(hidden[i, :n])
                    assert batch[i].dtype == alone.dtype == dtype and batch[i].flags.c_contiguous
                    np.testing.assert_allclose(batch[i].astype(np.float32), alone.astype(np.float32), atol=1e-6)
                    rows = hidden[i, :n].astype(np.float64)
                    expected = {"mean": rows.mean(0), "cls": rows[0], "none": rows}[pooling]
                    if normalize:
                        expected = expected / np.linalg.norm(expected, axis=-1, keepdims=True)
                    np.testing.assert_allclose(alone.astype(np.float64), expected,
                                               atol=1e-5 if dtype == np.float32 else 2e-3)
    for pooling in ("mean", "cls"):
        for compact in COMPACT:
            options = OutputOptions("last_hidden_state", pooling, True, DTYPES[compact], compact)
            batch = options.finish_batch(hidden, positions)
            for i, n in enumerate(positions):
                np.testing.assert_array_equal(batch[i], options(hidden[i, :n]))


def test_queue_bound_counts_reserved_inputs() -> None:
    b = _batcher([10, 10], max_queue=3)
    b.reserve(1)
    with pytest.raises(Exception, match="queue is full"):
        b.reserve(1)
    b.release(1)
    b.reserve(1)


# ---- model files --------------------------------------------------------------------------------------------


def test_read_metadata_round_trip(tmp_path: Path) -> None:
    model = make_tiny_model("text", tmp_path)
    meta = read_metadata(model.path)
    assert meta.modality == "text" and meta.max_positions == 64 and meta.precision == "fp32"
    assert meta.preprocessing["tokenizer"] == model.preprocessing.tokenizer_json


def _rewrite(path: Path, dst: Path, edit: object) -> Path:
    import onnx

    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    del proto.metadata_props[:]
    for key, value in edit(props).items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(dst))
    return dst


def test_read_metadata_rejects_bad_files(tmp_path: Path) -> None:
    model = make_tiny_model("image", tmp_path)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff" * 100)
    cases = {
        junk: "not a readable ONNX file",
        tmp_path / "missing.onnx": "no such file",
        _rewrite(model.path, tmp_path / "plain.onnx", lambda p: {}): "no 'd2v' metadata",
        _rewrite(model.path, tmp_path / "v3.onnx", lambda p: {"d2v": json.dumps(
            {**json.loads(p["d2v"]), "format_version": 3})}): "format_version 3 is not supported",
        _rewrite(model.path, tmp_path / "patch.onnx", lambda p: {"d2v": json.dumps(
            {**json.loads(p["d2v"]), "patch_size": 7})}): "not a multiple of patch_size 7",
        _rewrite(model.path, tmp_path / "nopatch.onnx", lambda p: {"d2v": json.dumps(
            {k: v for k, v in json.loads(p["d2v"]).items() if k != "patch_size"})}): "lacks patch_size",
        _rewrite(model.path, tmp_path / "pool.onnx", lambda p: {"d2v": json.dumps(
            {**json.loads(p["d2v"]), "representations": {"last": {"output": "last_hidden_state",
                                                                  "poolings": ["max"]}}})}): "poolings among",
        _rewrite(model.path, tmp_path / "wrong.onnx", lambda p: {"d2v": json.dumps(
            {**json.loads(p["d2v"]), "inputs": ["input_ids"]})}): "graph inputs",
        _rewrite(model.path, tmp_path / "notjson.onnx", lambda p: {"d2v": "{"}): "not JSON",
    }
    for path, message in cases.items():
        with pytest.raises(ModelFileError, match=message) as info:
            read_metadata(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_io_binding_run_equals_plain_run(tmp_path: Path) -> None:
    """The CUDA path (IOBinding, only the asked-for outputs copied back) checked on CPU."""
    import onnxruntime as ort

    from d2v_serve.backend.runner import Runner
    from d2v_serve.preprocess import collate

    model = make_tiny_model("text", tmp_path)
    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    feeds = collate("text", [model.preprocessing.prepare(t) for t in ("hello world", "a longer sentence here")])
    outputs = ["target_hidden_state", "output_mask"]
    plain = Runner(session).run(feeds, outputs)
    bound = Runner(session, io_binding=True).run(feeds, outputs)
    assert list(bound) == outputs
    for name in outputs:
        np.testing.assert_array_equal(bound[name], plain[name])


def test_ort_log_lines_are_parsed() -> None:
    from d2v_serve.backend.ort_log import parse

    text = ("\x1b[1;31m2026-12-01 21:21:39.774 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] "
            "Failed to load library x.so with error: libcublasLt.so.13: cannot open shared object file\n\x1b[m\n"
            "\x1b[0;93m2026-12-01 21:21:39.775 [W:onnxruntime:Default, pybind_state.cc:1295 Create] Failed to create "
            "CUDAExecutionProvider.\nsecond line\x1b[m\n"
            '{"level": "info", "msg": "another thread"}\n')
    lines, others = parse(text)
    assert [(line.level, line.source) for line in lines] == [
        (logging.ERROR, "provider_bridge_ort.cc:2458 operator()"), (logging.WARNING, "pybind_state.cc:1295 Create")]
    assert lines[0].message.endswith("libcublasLt.so.13: cannot open shared object file")
    assert lines[1].message == "Failed to create CUDAExecutionProvider. second line"
    assert others == ['{"level": "info", "msg": "another thread"}']


_CAPTURE_SCRIPT = """
import logging, os, sys
from d2v_serve.backend import ort_log
from d2v_serve.logs import setup_logging
setup_logging("info", "json")
lines = []
with ort_log.captured(lines):
    os.write(2, b"\\x1b[0;93m2026-12-01 21:21:39.7 [W:onnxruntime:Default, x.cc:1 F] C++ says\\x1b[m\\n")
    print("*************** EP Error ***************")  # what ORT's Python fallback prints
    print("EP Error boom when using ['CUDAExecutionProvider']")
    print("****************************************")
    logging.getLogger("d2v_serve.other").warning("meanwhile")  # another logger's line passes through
ort_log.emit(lines)
print("after", file=sys.stdout)
"""


def test_ort_output_on_both_descriptors_becomes_log_records() -> None:
    r = subprocess.run([sys.executable, "-c", _CAPTURE_SCRIPT], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "after\n", "ORT's prints do not reach stdout"
    records = [json.loads(line) for line in r.stderr.splitlines()]
    assert [(e["logger"], e["level"], e["msg"]) for e in records] == [
        ("d2v_serve.other", "warning", "meanwhile"),
        ("d2v_serve.onnxruntime", "warning", "C++ says"),
        ("d2v_serve.onnxruntime", "warning", "EP Error boom when using ['CUDAExecutionProvider']"),
    ]


_SESSION_SCRIPT = """
import sys
from d2v_serve.logs import setup_logging
from d2v_serve.backend.runner import RuntimeSettings, create_session
setup_logging("debug" if sys.argv[2] == "auto" else "info", "json")
try:
    print(create_session(sys.argv[1], RuntimeSettings(device=sys.argv[2])).get_providers()[0])
except RuntimeError as exc:
    print("RuntimeError:", exc)
"""


@pytest.mark.parametrize("device", ["auto", "cuda", "cpu"])
def test_sessions_log_only_json_and_say_why_cuda_is_not_used(device: str) -> None:
    check_session_logs(sys.executable, device)


def check_session_logs(python: str, device: str) -> None:
    """CUDA hidden (CUDA_VISIBLE_DEVICES=""), so onnxruntime-gpu fails to start its CUDA provider on any machine:
    `auto` warns once with ORT's reason and runs on the CPU, `cuda` fails naming the reason; every stderr line is
    one of our JSON records (ORT's own lines included). With plain onnxruntime (the default install) there is no CUDA
    to try; tests/test_deploy.py runs this with the serving install that has onnxruntime-gpu."""
    model = REPO / "d2v_serve" / "demo_models" / "demo-text.onnx"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([python, "-c", _SESSION_SCRIPT, str(model), device], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stderr.splitlines()]  # raises on any line that is not JSON
    warnings = [e for e in records if e["level"] == "warning" and e["logger"] == "d2v_serve.backend.runner"]
    providers = subprocess.run([python, "-c", "import onnxruntime as o; print(o.get_available_providers())"],
                               capture_output=True, text=True, timeout=60).stdout
    has_cuda = "CUDAExecutionProvider" in providers
    if device == "cpu" or not has_cuda:
        assert warnings == [] and (r.stdout.strip() == "CPUExecutionProvider" or device == "cuda")
        return
    if device == "auto":
        assert r.stdout.strip() == "CPUExecutionProvider"
        assert [w["msg"] for w in warnings] == ["CUDA is not usable; running on the CPU"]
        assert len(warnings[0]["reason"]) > 10 and "[ONNXRuntimeError]" not in warnings[0]["reason"]
        ort_lines = [e for e in records if e["logger"] == "d2v_serve.onnxruntime"]
        assert ort_lines and all(e["level"] == "debug" for e in ort_lines), "expected in auto mode: DEBUG"
    else:
        assert r.stdout.startswith("RuntimeError:") and "CUDA was requested but is not active: " in r.stdout
        assert any(e["logger"] == "d2v_serve.onnxruntime" and e["level"] == "error" for e in records)


# ---- configuration ------------------------------------------------------------------------------------------


def test_flags_override_env_override_defaults() -> None:
    env = {"D2V_MAX_BATCH_SIZE": "8", "D2V_WARMUP": "false", "D2V_DEVICE": "cpu", "D2V_MAX_DELAY_MS": "0.5"}
    cfg = parse_config(["--max-batch-size", "4"], env=env)
    assert cfg.max_batch_size == 4 and cfg.warmup is False and cfg.device == "cpu" and cfg.max_delay_ms == 0.5
    assert parse_config([], env={}).max_batch_size == ServerConfig().max_batch_size


def test_bad_settings_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="D2V_PORT='abc'"):
        parse_config([], env={"D2V_PORT": "abc"})
    with pytest.raises(ValueError, match="D2V_DEVICE"):
        parse_config([], env={"D2V_DEVICE": "tpu"})
    with pytest.raises(ValueError, match="--max-request-inputs"):
        parse_config(["--max-request-inputs", "10", "--max-queue", "5"], env={})
    with pytest.raises(ValueError, match="--tls-cert and --tls-key"):
        parse_config(["--tls-cert", "c.pem"], env={})


def test_secrets_are_redacted() -> None:
    assert ServerConfig(auth_token="t0ken").redacted()["auth_token"] == "***"


# ---- tensors and client helpers ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["<f4", ">f4", "<f2"])
def test_tensor_round_trip(dtype: str) -> None:
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4).astype(dtype)
    t = to_tensor(x)
    assert list(t.shape) == [2, 3, 4] and len(t.data) == x.nbytes
    assert t.dtype == (pb.DTYPE_FLOAT16 if "f2" in dtype else pb.DTYPE_FLOAT32)
    np.testing.assert_array_equal(from_tensor(t), x)
    assert t.data == np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<")).tobytes()  # little-endian on the wire


def test_sniff_media() -> None:
    for fmt in ("WAV", "FLAC", "OGG"):
        assert sniff(encode_audio(tone(0.1), 16000, fmt)) == "audio"
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"):
        assert sniff(encode_image(picture(8, 8), fmt)) == "image"
    with pytest.raises(ValueError, match="Audio"):
        sniff(b"plain text")


# ---- generated stubs ----------------------------------------------------------------------------------------


def test_regenerating_stubs_gives_the_committed_files(tmp_path: Path) -> None:
    out = tmp_path / "_proto"
    subprocess.run([sys.executable, str(REPO / "scripts" / "gen_protos"), str(out)], check=True,
                   capture_output=True)
    committed = REPO / "d2v_serve" / "_proto"
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(committed) for p in committed.rglob("*")
                           if p.is_file() and "__pycache__" not in p.parts)
    for rel in files:
        assert (out / rel).read_bytes() == (committed / rel).read_bytes(), f"{rel} differs: run scripts/gen_protos"


def test_dependency_floors_cover_the_generated_stubs() -> None:
    """The stubs refuse to import under an older grpcio/protobuf, so pyproject must not allow one."""
    stubs = REPO / "d2v_serve" / "_proto" / "d2v" / "v1"
    grpc_needs = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", (stubs / "embedder_pb2_grpc.py").read_text())
    pb_needs = re.search(r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", (stubs / "embedder_pb2.py").read_text())
    assert grpc_needs and pb_needs
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = dict(re.fullmatch(r"([\w-]+)>=([\d.]+)", d).groups() for d in deps if d.startswith(("grpcio", "protobuf")))
    for package in ("grpcio", "grpcio-health-checking", "grpcio-reflection"):
        assert floors[package] == grpc_needs.group(1), package
    assert floors["protobuf"] == ".".join(pb_needs.groups())
