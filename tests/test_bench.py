"""The bench's logic: rates, percentiles, metrics parsing, workloads, reports, arguments (no timing assertions),
and one smoke run of bench/run on a tiny model."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from bench import cli, engines, report, stats
from bench.loadgen import closed_loop
from bench.server import batch_stats
from bench.workloads import WORKLOADS, Workload, parse_workloads, variant
from d2v_serve.client import Pcm

ROOT = Path(__file__).resolve().parent.parent


# ---- stats ----------------------------------------------------------------------------------------------------


def test_percentiles_interpolate_and_empty_is_nan():
    p = stats.percentiles(list(range(1, 101)))
    assert p["p50"] == pytest.approx(50.5)
    assert p["p99"] == pytest.approx(99.01)
    assert all(math.isnan(v) for v in stats.percentiles([]).values())


def test_edge_rate_counts_whole_batches():
    # batches of 4 answered every second (a few ms apart inside a batch): 4 items/s whatever the window edges
    ends = [b + 0.001 * i for b in range(1, 11) for i in range(4)]
    for start, stop in ((0.5, 10.5), (1.002, 9.7), (2.5, 8.0)):
        rate, count, seconds = stats.edge_rate(ends, start, stop)
        assert rate == pytest.approx(4.0, rel=0.01)
        assert count % 4 == 0 and seconds > 0
    # a plain window would be biased by the partial batches at its edges
    assert 24 / (9.7 - 1.002) != pytest.approx(4.0, rel=0.05)


def test_edge_rate_of_evenly_spread_completions():
    ends = list(np.arange(0, 10, 0.1))
    rate, count, _ = stats.edge_rate(ends, 2.0, 8.0)
    assert rate == pytest.approx(10.0, rel=0.02)
    assert count > 50


def test_edge_rate_with_too_few_completions_falls_back_to_the_window():
    assert stats.edge_rate([1.0, 2.0], 0.0, 4.0) == (0.5, 2, 4.0)
    assert stats.edge_rate([], 0.0, 4.0) == (0.0, 0, 4.0)


def _metrics_page(batches: list[int], paddings: list[float], valid: int = 0, padded: int = 0) -> str:
    registry = CollectorRegistry()
    size = Histogram("d2v_batch_size", "", ["model"], buckets=(1, 2, 4, 8, 16, 32), registry=registry)
    pad = Histogram("d2v_batch_padding_fraction", "", ["model"], buckets=(0.0, 0.1, 0.5, 1.0), registry=registry)
    positions = Counter("d2v_batch_positions", "", ["model", "kind"], registry=registry)
    for b in batches:
        size.labels("m").observe(b)
    for p in paddings:
        pad.labels("m").observe(p)
    size.labels("other").observe(64)
    positions.labels("m", "valid").inc(valid)
    positions.labels("m", "padded").inc(padded)
    return generate_latest(registry).decode()


def test_histograms_parse_and_subtract():
    before = stats.histograms(_metrics_page([1, 2], [0.0, 0.0]), "d2v_batch_size")["m"]
    after = stats.histograms(_metrics_page([1, 2, 8, 8, 3], [0.0] * 5), "d2v_batch_size")["m"]
    delta = after - before
    assert delta.count == 3 and delta.total == 19
    assert delta.mean == pytest.approx(19 / 3)
    assert delta.counts() == {"<=4": 1, "<=8": 2}


def test_batch_stats_between_two_scrapes():
    before = _metrics_page([4], [0.5], valid=10, padded=10)
    after = _metrics_page([4, 8, 8], [0.5, 0.1, 0.2], valid=110, padded=30)
    out = batch_stats(before, after, "m")
    assert out["batches"] == 2 and out["mean_batch"] == 8.0
    assert out["batch_sizes"] == {"<=8": 2}
    assert out["padded_fraction_per_batch"] == pytest.approx(0.15)
    assert out["padded_fraction"] == pytest.approx(20 / 120, abs=1e-4)
    assert batch_stats(before, after, "absent") == {}


def test_ratio_handles_missing_values():
    assert stats.ratio(3.0, 2.0) == 1.5
    assert stats.ratio(None, 2.0) is None and stats.ratio(1.0, 0.0) is None
    assert stats.ratio(float("nan"), 1.0) is None


# ---- workloads ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_meta():
    from d2v_serve.models.model_file import ModelFileMeta
    from d2v_serve.preprocess import train_bpe_tokenizer
    from tests.hf_models import CORPUS

    pre = train_bpe_tokenizer(CORPUS, vocab_size=300, min_frequency=1).to_dict()
    pre["max_length"] = 64
    return ModelFileMeta(modality="text", hidden_size=64, num_layers=1, num_heads=1, precision="fp32",
                         preprocessing=pre, representations={}, max_positions=64)


def test_texts_have_the_asked_token_count_and_differ(text_meta):
    w = WORKLOADS["text-12"]
    texts = w.inputs(text_meta, 50, seed=1)
    assert len(set(texts)) == 50
    counts = [w.units(text_meta, t) for t in texts]
    assert min(counts) >= 12 and np.mean(counts) < 14


def test_too_long_text_workload_is_refused(text_meta):
    with pytest.raises(ValueError, match="at most 64 tokens"):
        WORKLOADS["text-128"].inputs(text_meta, 1)


def test_audio_workload_lengths_and_units():
    w = WORKLOADS["audio-mixed"]
    clips = w.inputs({}, 40, seed=0)
    seconds = [w.units({}, c) for c in clips]
    assert 0.5 <= min(seconds) and max(seconds) <= 10.0 and len({len(c.samples) for c in clips}) > 30
    assert w.unit == "audio_s"


def test_variants_differ_and_keep_the_length():
    text = "one two three four five"
    seen = {variant(text, k) for k in range(10)}
    assert len(seen) == 10 and all(len(v.split()) == 5 for v in seen)
    clip = Pcm(np.arange(1000, dtype=np.float32), 16000)
    moved = variant(clip, 1)
    assert len(moved.samples) == 1000 and not np.array_equal(moved.samples, clip.samples)
    assert variant(text, 0) == text


def test_distinct_counts():
    assert Workload("t", "text", "text", tokens=12).distinct(100, 4) == 80
    assert WORKLOADS["audio-2s"].distinct(1000, 10) == 1000
    assert WORKLOADS["image"].distinct(1000, 10) == 10


def test_parse_workloads():
    assert [w.name for w in parse_workloads("text-12, audio-2s")] == ["text-12", "audio-2s"]
    with pytest.raises(ValueError, match="unknown workload.*nope"):
        parse_workloads("text-12,nope")


# ---- the load generator's loop ------------------------------------------------------------------------------


def test_closed_loop_sends_distinct_inputs_and_counts_errors():
    sent: list[str] = []

    async def send(item: str) -> None:
        await asyncio.sleep(0)
        if len(sent) % 10 == 9:
            sent.append(item)
            raise RuntimeError("refused")
        sent.append(item)

    pool = [f"a b c {i}" for i in range(5)]  # 5 texts x 4 words x 2 (rotated, reversed) = 40 distinct inputs
    records = asyncio.run(closed_loop(send, pool, concurrency=4, duration=0.2, warmup=0.05, max_calls=40))
    assert records["calls"] == 40 == len(sent)  # bounded by calls (the loop is fast)
    assert len(set(sent)) == len(sent)  # every call a distinct input
    assert sum(records["errors"].values()) == 4
    assert len(records["ends"]) == 36 and all(e >= s for s, e in zip(records["starts"], records["ends"], strict=True))


def test_closed_loop_cancels_the_calls_in_flight_when_the_run_ends():
    """A slow call still running at the end is cancelled, not waited for, and not counted."""
    cancelled: list[int] = []
    calls: list[str] = []

    async def send(item: str) -> None:
        calls.append(item)
        try:
            await asyncio.sleep(0.05 if len(calls) <= 4 else 30.0)  # the 5th call on would take 30 s
        except asyncio.CancelledError:
            cancelled.append(1)
            raise

    t0 = time.perf_counter()
    records = asyncio.run(closed_loop(send, [f"a b {i}" for i in range(5)], concurrency=2, duration=0.3,
                                      warmup=0.0))
    assert time.perf_counter() - t0 < 5  # not the 30 s of the slow calls
    assert len(cancelled) == 2 and len(records["ends"]) == len(records["starts"]) == 4
    assert records["window"][1] >= records["window"][0] + 0.3


def test_usage_waits_until_the_server_is_idle(monkeypatch):
    """The server's inputs count is read once nothing is queued and the count has settled."""
    from bench import server as bench_server

    pages = iter([_page(3, 2), _page(5, 0), _page(6, 0), _page(6, 0)])

    class Reply:
        def __init__(self) -> None:
            self.text = next(pages)

        def __enter__(self):  # noqa: ANN204 - a stand-in for urlopen's response
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def read(self) -> bytes:
            return self.text.encode()

    monkeypatch.setattr(bench_server.urllib.request, "urlopen", lambda *a, **k: Reply())
    monkeypatch.setattr(bench_server.time, "sleep", lambda s: None)
    monkeypatch.setattr(bench_server, "cpu_seconds", lambda pid: 1.5)
    server = bench_server.D2vServer([])
    server.proc = type("Proc", (), {"pid": 1})()
    assert server.usage("m") == (1.5, 6.0)


def _page(inputs_run: int, queued: int) -> str:
    return ("# TYPE d2v_batch_size histogram\n"
            f'd2v_batch_size_bucket{{model="m",le="+Inf"}} 2.0\nd2v_batch_size_count{{model="m"}} 2.0\n'
            f'd2v_batch_size_sum{{model="m"}} {inputs_run}.0\n'
            f'# TYPE d2v_queue_depth gauge\nd2v_queue_depth{{model="m"}} {queued}.0\n')


# ---- FLOPs ----------------------------------------------------------------------------------------------------


def test_text_flops_by_hand():
    cfg = {"modality": "text", "hidden_size": 4, "ffn_size": 8, "num_layers": 2}
    # per layer: 2 x 3 positions x (4 x 16 + 2 x 4 x 8) + 4 x 9 x 4
    assert engines.model_flops(cfg, 3) == 2 * (2 * 3 * (64 + 64) + 144)


def test_audio_flops_use_the_front_ends_frames():
    from d2v.training.models import EncoderConfig
    from d2v_serve.preprocess import audio_frames

    cfg = EncoderConfig.preset("audio", "base").to_dict()
    frames = audio_frames(32000, cfg["conv_layers"])
    assert engines.model_flops(cfg, 32000) > engines.transformer_flops(cfg, frames)
    assert engines.model_flops(cfg, 32000) < engines.transformer_flops(cfg, frames) * 3


# ---- report ---------------------------------------------------------------------------------------------------


def _load(c: int, rate: float, cpu_rate: float | None = None, **server) -> dict:
    return {"concurrency": c, "items_per_s": rate, "units_per_s": rate * 12, "unit": "tokens", "mean_units": 12.0,
            "p50_ms": 10.0 * c, "p99_ms": 20.0 * c, "items_per_cpu_s": cpu_rate, "server": server}


def test_workload_row_ratios():
    row = report.workload_row("text-12", "text", {1: _load(1, 20.0, 10.0), 32: _load(32, 30.0, 12.0, mean_batch=16.0)},
                              [{"batch": 1, "items_per_s": 25.0, "items_per_cpu_s": 16.0},
                               {"batch": 16, "items_per_s": 40.0, "items_per_cpu_s": 15.0}],
                              flops_per_item=1e9, gemm_gflops=100.0)
    assert row["batching_gain"] == 1.5
    assert row["cpu_batching_gain"] == 1.2 and row["cpu_server_over_raw_best"] == 0.75
    assert row["raw_ort_best"]["batch"] == 16 and row["server_over_raw_best"] == 0.75
    assert row["model_gflops_per_s"] == 30.0 and row["model_gflops_per_cpu_s"] == 12.0
    assert row["fraction_of_gemm_peak"] == 0.12


def test_goals_and_render():
    results = {
        "concurrency": [1, 32],
        "workloads": [
            report.workload_row("text-12", "text", {1: _load(1, 20.0), 32: _load(32, 19.5)},
                                [{"batch": 1, "items_per_s": 20.0}]),
            report.workload_row("audio-mixed", "audio", {1: _load(1, 2.0), 32: _load(32, 1.0, padded_fraction=0.3)},
                                []),
        ],
        "engines": [report.engine_row("text", {"batch": 8, "length": 128, "threads": 2, "torch_s": 1.0,
                                               "fp32_s": 0.5, "int8_s": 0.25, "int8_cosine": 0.995})],
        "servers": [{"models": "text", "cold_start_s": 3.2, "rss_mb": 900.0, "peak_rss_mb": 950.0}],
        "gemm": {"gflops": 50.0, "n": 1024, "threads": 2},
    }
    results["goals"] = report.goals(results)
    met = {g["goal"]: g["met"] for g in results["goals"]}
    assert met["text-12: top concurrency >= 0.95 x lowest"] is True  # 0.97
    assert met["audio-mixed: top concurrency >= 0.95 x lowest"] is False
    assert met["audio-mixed: padded fraction <= 0.10 at top concurrency"] is False
    assert met["audio-mixed: server >= 0.90 x raw ORT at its best batch"] is None  # no raw figures
    assert met["ORT fp32 >= 1.3 x torch eager (text 8x128, 2 thread(s))"] is True
    assert met["int8 >= 3 x fp32 (text 8x128, 2 thread(s))"] is False
    text = report.render(results)
    assert "| text-12 | 20.0 | 19.5 | 0.97 | 20.0 (b1) | 0.97 | -, - | 10 / 20 | 320 / 640 |" in text
    assert "10 / 20" in text and "320 / 640" in text
    assert "| text | 3.2 | 900 | 950 |" in text
    assert "GEMM peak" in text and "**no**" in text


def test_markdown_numbers():
    assert report.markdown_number(1736.4) == "1736"
    assert report.markdown_number(12.34) == "12.3"
    assert report.markdown_number(0.012345) == "0.0123"
    assert report.markdown_number(None) == "-" and report.markdown_number(float("nan")) == "-"


# ---- the docs' bench-written sections -------------------------------------------------------------------------

PAGE = """# Bench
intro
<!-- bench:compact_vectors -->
| old | table |
<!-- /bench:compact_vectors -->
between
<!-- bench:bulk:memory -->
old memory
<!-- /bench:bulk:memory -->
end
"""


def test_doc_section_writer_replaces_only_its_section(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    report.write_doc_sections({"compact_vectors": "| new | table |\n|---|---|\n"}, page)
    text = page.read_text()
    assert "<!-- bench:compact_vectors -->\n| new | table |\n|---|---|\n<!-- /bench:compact_vectors -->" in text
    assert "old table" not in text
    assert text.replace("| new | table |\n|---|---|", "| old | table |") == PAGE  # the rest byte for byte
    report.write_doc_sections({"bulk:memory": "new memory"}, page)
    assert page.read_text().count("new memory") == 1 and "old memory" not in page.read_text()
    assert report.doc_sections(page.read_text()) == ["compact_vectors", "bulk:memory"]


@pytest.mark.parametrize("text", [PAGE.replace("<!-- /bench:compact_vectors -->", ""),
                                  PAGE.replace("<!-- bench:compact_vectors -->", ""),
                                  PAGE + "<!-- bench:compact_vectors -->\n<!-- /bench:compact_vectors -->\n"])
def test_a_missing_or_doubled_marker_is_a_one_line_error(tmp_path, text):
    page = tmp_path / "page.md"
    page.write_text(text)
    with pytest.raises(SystemExit) as e:
        report.write_doc_sections({"compact_vectors": "x"}, page)
    message = str(e.value)
    assert "\n" not in message and "bench:compact_vectors" in message and "page.md" in message
    assert page.read_text() == text  # nothing written
    with pytest.raises(SystemExit):  # the check a script makes before its run
        report.check_doc_sections(["tracing_overhead"], page)


def test_every_bench_section_of_the_benchmarks_page_names_a_bench_module_that_writes_it():
    text = report.BENCHMARKS_PAGE.read_text()
    names = report.doc_sections(text)
    assert names, "docs/benchmarks.md has no bench-written section"
    for name in names:
        module = name.split(":")[0]
        source = ROOT / "bench" / f"{module}.py"
        assert source.is_file(), f"section {name!r}: no bench/{module}.py"
        assert "--write-docs" in source.read_text(), f"bench/{module}.py has no --write-docs"
        report.replace_doc_section(text, name, "")  # one opening and one closing marker, in order
    assert len(names) == len(set(names))


def test_bulk_sections_render_the_runs_tables():
    results = {
        "raw_ort": {"batches": [{"batch": 8, "items_per_s": 1500.0, "items_per_cpu_s": 2145.0},
                                {"batch": 16, "items_per_s": 1595.0, "items_per_cpu_s": 2166.0}],
                    "best": {"batch": 16, "items_per_s": 1595.0, "items_per_cpu_s": 2166.0}},
        "local": {"items": 20000, "job_items_per_s": 667.2, "items_per_cpu_s": 1344.0},
        "server_loop": {"items_per_s": 452.0, "items_per_cpu_s": 1251.0},
        "bulk_via_server": {"job_items_per_s": 416.0, "items_per_cpu_s": 1222.0},
        "ray": {"1": {"job_items_per_s": 378.0}, "2": {"job_items_per_s": 723.0}},
        "ratios": {"local_vs_raw_ort": 0.62, "local_vs_server_loop": 1.074, "ray_2_vs_1": 1.913},
        "memory": {"10000": {"peak_rss_mb": 246.6, "job_wall_s": 13.9}},
    }
    sections = report.bulk_sections(results)
    assert "| raw ORT, best batch (16; 8: 2145) | 2166 | 1595 |" in sections["bulk"]
    assert "| **local / embed_stream loop** (target >= 1.2) | **1.07x** |  |" in sections["bulk"]
    assert "| Ray, 1 replica / 2 replicas (`--threads 1` each), job items/s |  | 378 / 723 |" in sections["bulk"]
    assert sections["bulk:memory"].splitlines()[-1] == "| 10,000 | 246.6 | 13.9 |"
    del results["ray"]
    assert list(report.bulk_sections(results)) == ["bulk:memory"]  # no half table


# ---- arguments ------------------------------------------------------------------------------------------------


def test_parse_args_fills_the_modes_defaults():
    args = cli.parse_args(["--full", "--workloads", "text-12", "--concurrency", "32,1,8,8"])
    assert args.levels == [1, 8, 32] and args.duration == cli.MODES["full"].duration
    assert [w.name for w in args.workload_list] == ["text-12"]
    assert cli.parse_args([]).mode == "quick"


@pytest.mark.parametrize("argv, message", [
    (["--concurrency", "0,8"], ">= 1"),
    (["--concurrency", "a"], "comma-separated integers"),
    (["--workloads", "video"], "unknown workload"),
    (["--duration", "0"], "--duration"),
    (["--threads", "-1"], "--threads"),
    (["--rounds", "0"], "--rounds"),
    (["--models-dir", "/no/such/dir"], "not a folder"),
])
def test_bad_arguments_are_one_line_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        cli.parse_args(argv)


def test_best_of_rounds_keeps_the_faster_and_every_rate():
    first = cli.best_of(None, {"items_per_s": 5.0, "p99_ms": 9.0})
    second = cli.best_of(first, {"items_per_s": 7.0, "p99_ms": 8.0})
    third = cli.best_of(second, {"items_per_s": 6.0, "p99_ms": 1.0})
    assert third["items_per_s"] == 7.0 and third["p99_ms"] == 8.0 and third["rounds"] == [5.0, 7.0, 6.0]
    assert cli.parse_args(["--full"]).rounds == 2 and cli.parse_args(["--rounds", "3"]).rounds == 3


def test_raw_batches_follow_the_servers_mean_batch():
    assert cli.raw_batches(cli.MODES["quick"], {"server": {"mean_batch": 15.6}}) == [1, 16]
    assert cli.raw_batches(cli.MODES["quick"], {}) == [1]
    assert cli.raw_batches(cli.MODES["full"], {}) == [1, 4, 8, 16, 32]


# ---- smoke: the command on a tiny model ----------------------------------------------------------------------


def test_bench_run_smoke(tmp_path):
    from tests.factories import make_model_file

    models = tmp_path / "models"
    make_model_file("text", models)
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, "-m", "bench.cli", "--models-dir", str(models), "--workloads", "text-12",
                           "--concurrency", "1,2", "--duration", "0.5", "--warmup", "0.2", "--no-engines",
                           "--no-gemm", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    row = result["workloads"][0]
    assert row["workload"] == "text-12" and set(row["by_concurrency"]) == {"1", "2"}
    assert row["by_concurrency"]["2"]["items_per_s"] > 0 and not row["by_concurrency"]["2"]["errors"]
    assert row["by_concurrency"]["2"]["server"]["batches"] > 0
    assert row["raw_ort"] and result["servers"][0]["cold_start_s"] > 0
    assert "| text-12 |" in done.stdout


def test_bench_run_refuses_missing_models(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.cli", "--models-dir", str(tmp_path), "--workloads",
                           "audio-2s", "--no-engines", "--no-gemm"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == f"bench/run: no audio.onnx in {tmp_path}"


# ---- the GPU check (its logic; the run itself needs a GPU) ---------------------------------------------------


def _gpu_check_module():
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader("gpu_check", str(ROOT / "bench" / "gpu_check"))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_gpu_check_refuses_without_a_gpu():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check")], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin"})  # no nvidia-smi on this PATH (nor here)
    assert done.returncode == 3
    assert done.stderr.strip() == ("bench/gpu_check: no NVIDIA GPU found (nvidia-smi lists none); run it on a "
                                   "machine with one")


def test_gpu_names_parses_nvidia_smi(monkeypatch):
    gpu_check = _gpu_check_module()
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    listing = "GPU 0: NVIDIA H200 (UUID: GPU-1234)\nGPU 1: NVIDIA H200 (UUID: GPU-5678)\n"
    ok = lambda *a, **k: subprocess.CompletedProcess(a, 0, listing, "")  # noqa: E731
    assert gpu_check.gpu_names(ok) == ["NVIDIA H200", "NVIDIA H200"]
    failed = lambda *a, **k: subprocess.CompletedProcess(a, 9, "", "NVIDIA-SMI has failed")  # noqa: E731
    assert gpu_check.gpu_names(failed) == []


def test_gpu_check_requirements_keep_a_machines_torch():
    gpu_check = _gpu_check_module()
    text = (ROOT / "pyproject.toml").read_text()
    with_torch = gpu_check.requirements(text, have_torch=True)
    assert not any(r.startswith("torch") for r in with_torch)
    assert "torch==2.13.0" in gpu_check.requirements(text, have_torch=False)
    assert with_torch.count("onnxruntime-gpu") == 1 and not any(r.startswith("onnxruntime>") for r in with_torch)
    assert any(r.startswith("aiohttp") for r in with_torch) and any(r.startswith("onnx>") for r in with_torch)


def test_gpu_report_logic():
    from bench import gpu

    assert gpu.parse_gpu_memory("1234, 5678\n99, 10\nbad line\n") == {1234: 5678, 99: 10}
    load = {"items_per_s": 3000.0, "units_per_s": 384000.0, "unit": "tokens", "p50_ms": 20.0, "p99_ms": 40.0,
            "server": {"mean_batch": 60.0, "padded_fraction": 0.02}, "errors": {}}
    rows = [gpu.case_row(gpu.Case("text-128", "text-fp16"), load, [{"batch": 64, "items_per_s": 3200.0}], 4000),
            gpu.case_row(gpu.Case("text-128", "text"), {**load, "items_per_s": 1000.0, "units_per_s": 128000.0},
                         [], None)]
    assert rows[0]["server_over_raw"] == 0.94 and rows[1]["server_over_raw"] is None
    speedups = gpu.fp16_speedups(rows)
    assert speedups == {"text-128": 3.0}
    goals = {g["goal"]: g["met"] for g in gpu.goals(rows, speedups)}
    assert goals["base text fp16 >= 400k tokens/s at 128 tokens"] is False
    assert goals["base audio >= 5000 s of audio per second (fp16, 2 s clips)"] is None
    assert goals["fp16 >= 2 x fp32 (text-128)"] is True
    results = {"cases": rows, "fp16": {"text-fp16": {"provider": gpu.CUDA, "cuda_cosine": 0.9999, "ok": True}},
               "fp16_over_fp32": speedups, "ddp": {"ok": True, "detail": "exit 0, 5 steps"},
               "goals": gpu.goals(rows, speedups)}
    text = gpu.render(results)
    assert "| text-128 | text-fp16 | 3000 | 384000 tokens | 20.0 / 40.0 | 60.0 | 0.02 | 4000 | 3200 (b64) | 0.94 |" \
        in text
    assert "NCCL DDP smoke (torchrun, 1 GPU, d2v-train): ok" in text


def test_combined_load_generators():
    from bench.server import combine_loads

    one = {"calls": 10, "items": 8, "items_per_s": 4.0, "units_per_s": 48.0, "distinct_inputs": 10, "concurrency": 2,
           "errors": {"x": 1}, "p50_ms": 10.0, "p99_ms": 30.0, "mean_ms": 12.0, "window_s": 2.0, "server": {"a": 1}}
    two = {**one, "items_per_s": 6.0, "p50_ms": 14.0, "p99_ms": 50.0, "errors": {"x": 2, "y": 1}, "server": {}}
    both = combine_loads([one, two])
    assert both["items_per_s"] == 10.0 and both["concurrency"] == 4 and both["errors"] == {"x": 3, "y": 1}
    assert both["p50_ms"] == 12.0 and both["p99_ms"] == 50.0 and both["server"] == {"a": 1}
    assert combine_loads([one]) is one


def test_overhead_splits_cpu_by_thread_and_keeps_the_cheapest_round():
    from bench import overhead

    split = overhead.split_by_thread(10, {10: 1.0, 11: 5.0, 12: 0.5}, {10: 1.5, 11: 9.0, 12: 0.6, 13: 0.1}, 5.0)
    assert split["model_thread"] == pytest.approx(4.0) and split["event_loop"] == pytest.approx(0.5)
    assert split["other"] == pytest.approx(0.5)  # threads 12 and 13, and any that ended
    assert overhead.thread_cpu(os.getpid())  # this process's own threads

    def round_(server_ms: float, raw_ms: float) -> dict:
        return {"server": {"cpu_ms_per_item": server_ms}, "raw_cpu_ms_per_item": raw_ms, "raw_best_batch": 16,
                "raw_ort": [], "cpu_ratio": round(raw_ms / server_ms, 3)}

    best = overhead.cheapest([round_(6.0, 4.6), round_(5.5, 5.0)])
    assert best["server"]["cpu_ms_per_item"] == 5.5 and best["raw_cpu_ms_per_item"] == 4.6
    assert best["cpu_ratio"] == pytest.approx(4.6 / 5.5, abs=1e-3)
    assert best["overhead_cpu_ms_per_item"] == pytest.approx(0.9)
    assert [r["cpu_ratio"] for r in best["rounds"]] == [0.767, 0.909]
    assert overhead.main(["--workloads", "nope"]) == 2
