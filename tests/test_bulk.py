"""d2v-bulk: every engine (the core in-process, a running server over EmbedStream, Ray Data actors) writes the
vectors the server answers, for text, audio and images; bad inputs are recorded with the server's reason and counted;
a job killed with SIGKILL resumes with every id exactly once; another model or other options in the folder are
refused."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from d2v_serve.bulk.cli import main
from d2v_serve.cli import DEMO_MODELS
from d2v_serve.client import Audio, Client, EmbedError, Image
from tests.serve_fixtures import ServerThread, encode_audio, encode_image, picture, tone

WORDS = "the ferry leaves harbour at dawn a violin is tuned before concert snow covered quiet village".split()
TOO_LONG = "word " * 40_000  # over the demo text model's character limit: the server refuses it


def texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(2, 24))) for _ in range(n)]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(DEMO_MODELS) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[Client]:
    with Client(server.target) as c:
        yield c


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    ray = pytest.importorskip("ray", reason="the ray extra is part of the test install")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def bulk(*args: Any) -> int:
    return main([str(a) for a in args] + ["--quiet"])


def read_job(out: Path) -> pa.Table:
    return pq.read_table(sorted(glob.glob(str(out / "part-*.parquet"))))


def errors_of(out: Path) -> list[dict[str, Any]]:
    path = out / "errors.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def server_reason(client: Client, item: object, model: str) -> str:
    with pytest.raises(EmbedError) as info:
        client.embed([item], model)
    return info.value.message.partition(": ")[2]


# ---- corpora ------------------------------------------------------------------------------------------------


def text_corpus(tmp: Path) -> tuple[Path, dict[Any, object], dict[Any, object]]:
    """A text file: good lines (ids: line numbers), a blank line (skipped), a line over the limit."""
    lines = texts(150)
    lines[40] = ""
    lines[77] = TOO_LONG
    path = tmp / "docs.txt"
    path.write_text("\n".join(lines) + "\n")
    good = {i + 1: t for i, t in enumerate(lines) if t and t != TOO_LONG}
    return path, good, {78: TOO_LONG}


def audio_corpus(tmp: Path) -> tuple[Path, dict[Any, object], dict[Any, object]]:
    folder = tmp / "audio"
    (folder / "sub").mkdir(parents=True)
    good: dict[Any, object] = {}
    for i, seconds in enumerate([0.4, 1.0, 1.7, 0.6, 2.5]):
        name = f"sub/clip{i}.flac" if i % 2 else f"clip{i}.wav"
        data = encode_audio(tone(seconds, freq=220.0 * (i + 1), seed=i), 16000, "FLAC" if i % 2 else "WAV")
        (folder / name).write_bytes(data)
        good[name] = Audio(data)
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really")
    (folder / "notes.txt").write_text("not audio: not searched")
    return folder, good, {"broken.wav": Audio((folder / "broken.wav").read_bytes())}


def image_corpus(tmp: Path) -> tuple[Path, dict[Any, object], dict[Any, object]]:
    folder = tmp / "images"
    folder.mkdir()
    good: dict[Any, object] = {}
    for i, (w, h, fmt) in enumerate([(64, 48, "PNG"), (100, 100, "JPEG"), (40, 90, "PNG"), (33, 33, "WEBP")]):
        name = f"img{i}.{fmt.lower()}"
        data = encode_image(picture(w, h, seed=i), fmt)
        (folder / name).write_bytes(data)
        good[name] = Image(data)
    truncated = encode_image(picture(64, 64, seed=9), "PNG")[:60]
    (folder / "cut.png").write_bytes(truncated)
    return folder, good, {"cut.png": Image(truncated)}


CORPORA = {"text": text_corpus, "audio": audio_corpus, "image": image_corpus}


def check_against_server(client: Client, out: Path, modality: str, good: dict[Any, object],
                         bad: dict[Any, object], **opts: Any) -> None:
    table = read_job(out)
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(good) and len(ids) == len(set(ids))
    expected = client.embed([good[i] for i in ids], f"demo-{modality}", **opts)
    got = table.column("embedding").to_pylist()
    for i, (mine, theirs) in enumerate(zip(got, expected, strict=True)):
        np.testing.assert_allclose(np.asarray(mine, np.float32), theirs.astype(np.float32), atol=1e-5,
                                   err_msg=f"{modality} id {ids[i]}")
    errors = errors_of(out)
    assert sorted(e["id"] for e in errors) == sorted(bad)
    for e in errors:
        assert e["reason"] == server_reason(client, bad[e["id"]], f"demo-{modality}")
        assert e["code"] == "INVALID_ARGUMENT"


# ---- every engine gives the server's vectors -----------------------------------------------------------------


@pytest.mark.parametrize("modality", ["text", "audio", "image"])
def test_local_engine_matches_server(client: Client, tmp_path: Path, modality: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    source, good, bad = CORPORA[modality](tmp_path)
    out = tmp_path / "out"
    assert bulk(source, "--model", f"demo-{modality}", "--out", out, "--shard-size", 64, "--batch-size", 8) == 0
    check_against_server(client, out, modality, good, bad)
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"{len(good) + len(bad)} items, {len(bad)} errors" in summary and "items/s" in summary
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["spec"]["model"]["name"] == f"demo-{modality}" and len(manifest["spec"]["model"]["sha256"]) == 64
    assert sum(s["rows"] for s in manifest["finished"].values()) == len(good)


@pytest.mark.parametrize("modality", ["text", "audio", "image"])
def test_server_engine_matches_server(server: ServerThread, client: Client, tmp_path: Path, modality: str) -> None:
    source, good, bad = CORPORA[modality](tmp_path)
    out = tmp_path / "out"
    assert bulk(source, "--model", f"demo-{modality}", "--server", server.target, "--out", out,
                "--shard-size", 50, "--batch-size", 8) == 0
    check_against_server(client, out, modality, good, bad)


@pytest.mark.parametrize("modality", ["text", "audio", "image"])
def test_ray_engine_matches_server(ray_local: None, client: Client, tmp_path: Path, modality: str) -> None:
    source, good, bad = CORPORA[modality](tmp_path)
    out = tmp_path / "out"
    assert bulk(source, "--model", f"demo-{modality}", "--engine", "ray", "--replicas", 2, "--out", out,
                "--shard-size", 64, "--batch-size", 8) == 0
    check_against_server(client, out, modality, good, bad)


def test_ray_engine_reads_parquet_row_groups_and_resumes_a_killed_wave(ray_local: None, tmp_path: Path) -> None:
    """A Parquet text column read by Ray's read tasks (shards straddling row groups) gives the local engine's ids,
    vectors and errors; a wave killed before its commit (a piece left in .staging, its shard not in the manifest) is
    redone and nothing else."""
    docs: list[str | None] = list(texts(45, seed=3))
    docs[12], docs[31] = None, TOO_LONG
    pq.write_table(pa.table({"body": pa.array(docs, pa.string())}), tmp_path / "d.parquet", row_group_size=7)
    common = (tmp_path / "d.parquet", "--column", "body", "--model", "demo-text", "--shard-size", 10)
    assert bulk(*common, "--out", tmp_path / "local") == 0
    assert bulk(*common, "--out", tmp_path / "ray", "--engine", "ray", "--replicas", 2, "--batch-size", 4) == 0
    local, ray = read_job(tmp_path / "local"), read_job(tmp_path / "ray")
    assert ray.column("id").to_pylist() == local.column("id").to_pylist() == [i for i in range(45) if i not in (12, 31)]
    np.testing.assert_allclose(np.asarray(ray.column("embedding").to_pylist()),
                               np.asarray(local.column("embedding").to_pylist()), atol=1e-6)
    assert errors_of(tmp_path / "ray") == errors_of(tmp_path / "local") and len(errors_of(tmp_path / "ray")) == 2

    out = tmp_path / "ray"
    manifest = json.loads((out / "manifest.json").read_text())
    lost = manifest["finished"].pop("part-00003.parquet")  # shard 3 (rows 30-39, with the refused row 31)
    manifest["errors_bytes"] = len("".join(json.dumps(e) + "\n" for e in errors_of(out)[:1]).encode())
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "part-00003.parquet").rename(out / ".staging" / "part-00003.parquet.30")
    assert lost == {"rows": 9, "errors": 1}
    resumed = bulk(*common, "--out", out, "--engine", "ray", "--replicas", 2, "--batch-size", 4)
    assert resumed == 0
    assert read_job(out).column("id").to_pylist() == local.column("id").to_pylist()
    assert errors_of(out) == errors_of(tmp_path / "local") and not any((out / ".staging").iterdir())


def test_parquet_blocks_are_the_rows_of_a_range(tmp_path: Path) -> None:
    """What a Ray read task reads: any row range of a Parquet input, across row groups, in blocks of at most the
    asked size, equal to those rows of a whole pass."""
    from d2v_serve.bulk.sources import Source

    values = [f"text {i}" if i % 13 else None for i in range(100)]
    pq.write_table(pa.table({"text": pa.array(values, pa.string())}), tmp_path / "t.parquet", row_group_size=7)
    source = Source(tmp_path / "t.parquet", "text")
    every = list(source)
    for first, count, step in [(0, 100, 16), (10, 10, 4), (33, 40, 256), (95, 5, 2), (7, 7, 7)]:
        blocks = list(source.parquet_blocks(first, count, step))
        assert [r for b in blocks for r in b] == every[first: first + count]
        assert all(len(b) <= step for b in blocks)


def test_ray_commit_joins_a_shard_that_ray_wrote_in_pieces(tmp_path: Path) -> None:
    """Ray's write tasks may cut a shard: the driver's commit joins its pieces in order (with their errors), and
    refuses a shard whose rows did not all arrive."""
    pytest.importorskip("ray", reason="the ray extra is part of the test install")
    from d2v_serve.bulk.engines import JobFailed
    from d2v_serve.bulk.job import JobDir, embedding_array, output_schema
    from d2v_serve.bulk.ray_engine import Shard, ShardSink, commit_shard

    schema = output_schema(4, "float32", False, False)

    def block(first: int, n: int, bad: int = -1) -> pa.Table:
        ordinals = list(range(first, first + n))
        return pa.table({"ordinal": pa.array(ordinals, pa.int64()), "id": pa.array(ordinals, pa.int64()),
                         "embedding": embedding_array([np.full(4, i, np.float32) for i in ordinals], 4, False),
                         "positions": pa.array([3] * n, pa.int32()),
                         "code": pa.array(["INVALID_ARGUMENT" if i == bad else None for i in ordinals], pa.string()),
                         "reason": pa.array(["too long" if i == bad else None for i in ordinals], pa.string())})

    job = JobDir.open(tmp_path / "out", {"job": 1})
    job.staging.mkdir()
    sink = ShardSink(job.staging, schema, 10)
    pieces = sink.write([block(5, 7)], None) + sink.write([block(12, 8, bad=15)], None)  # shard 0's tail, shard 1
    assert [(p["shard"], p["first"], p["count"]) for p in pieces] == [(0, 5, 5), (1, 10, 2), (1, 12, 8)]
    with pytest.raises(JobFailed, match="part-00000.parquet: Ray wrote 5 of its 10 rows"):
        commit_shard(job, Shard(0, 0, 10), pieces, schema)
    assert commit_shard(job, Shard(1, 10, 10), pieces, schema) == (9, [
        {"id": 15, "code": "INVALID_ARGUMENT", "reason": "too long"}])
    table = pq.read_table(tmp_path / "out" / "part-00001.parquet")
    assert table.column("id").to_pylist() == [10, 11, 12, 13, 14, 16, 17, 18, 19]
    assert [v[0] for v in table.column("embedding").to_pylist()] == [10, 11, 12, 13, 14, 16, 17, 18, 19]
    assert errors_of(tmp_path / "out") == [{"id": 15, "code": "INVALID_ARGUMENT", "reason": "too long"}]
    JobDir.open(tmp_path / "out", {"job": 1})  # a new run: the uncommitted piece of shard 0 goes
    assert not (tmp_path / "out" / ".staging").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["errors.jsonl", "manifest.json",
                                                                     "part-00001.parquet"]


def test_per_position_float16_from_parquet_bytes(client: Client, tmp_path: Path) -> None:
    """Images as a Parquet bytes column (ids: row numbers), pooling none in float16: a list column of float16
    vectors, one per position, equal to the server's."""
    _, good, _ = image_corpus(tmp_path)
    data = [item.data for item in good.values()]
    pq.write_table(pa.table({"image": pa.array(data, pa.binary())}), tmp_path / "images.parquet")
    out = tmp_path / "out"
    assert bulk(tmp_path / "images.parquet", "--column", "image", "--model", "demo-image", "--out", out,
                "--pooling", "none", "--dtype", "float16") == 0
    table = read_job(out)
    column = table.schema.field("embedding").type
    assert pa.types.is_list(column) and column.value_type.value_type == pa.float16()
    assert table.column("id").to_pylist() == list(range(len(data)))
    expected = client.embed([Image(d) for d in data], "demo-image", pooling="none", dtype="float16")
    for row, theirs in zip(table.to_pylist(), expected, strict=True):
        mine = np.asarray(row["embedding"], np.float16)
        assert mine.shape == theirs.shape and row["positions"] == theirs.shape[0]
        np.testing.assert_allclose(mine.astype(np.float32), theirs.astype(np.float32), atol=1e-3)


def test_manifests_jsonl_csv_and_paths(tmp_path: Path) -> None:
    """JSONL with `text` (ids: line numbers), CSV with `path`, a list of paths with a missing file (NOT_FOUND)."""
    docs = texts(5)
    (tmp_path / "docs.jsonl").write_text("\n".join([*(json.dumps({"text": t}) for t in docs), "{oops"]) + "\n")
    assert bulk(tmp_path / "docs.jsonl", "--model", "demo-text", "--out", tmp_path / "j") == 0
    assert read_job(tmp_path / "j").column("id").to_pylist() == [1, 2, 3, 4, 5]
    assert [e["id"] for e in errors_of(tmp_path / "j")] == [6]

    folder, good, _ = audio_corpus(tmp_path)
    (tmp_path / "clips.csv").write_text("path,label\n" + "".join(f"audio/{n},x\n" for n in good))
    assert bulk(tmp_path / "clips.csv", "--model", "demo-audio", "--out", tmp_path / "c") == 0
    assert read_job(tmp_path / "c").column("id").to_pylist() == [f"audio/{n}" for n in good]

    (tmp_path / "list.txt").write_text("audio/clip0.wav\naudio/missing.wav\n")
    assert bulk(tmp_path / "list.txt", "--model", "demo-audio", "--out", tmp_path / "l") == 0
    assert errors_of(tmp_path / "l") == [{"id": "audio/missing.wav", "code": "NOT_FOUND",
                                          "reason": f"no such file: {tmp_path / 'audio/missing.wav'}"}]


# ---- crash safety, refusals, fail-fast ------------------------------------------------------------------------


def _shards_done(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["finished"])
    except (OSError, ValueError, KeyError):
        return 0


def test_sigkill_mid_job_then_resume_has_every_id_once(tmp_path: Path) -> None:
    lines = texts(3000, seed=1)
    lines[1234] = TOO_LONG
    (tmp_path / "docs.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "d2v_serve.bulk", str(tmp_path / "docs.txt"), "--model", "demo-text", "--out",
               str(out), "--shard-size", "100", "--batch-size", "16", "--quiet"]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _shards_done(out) < 3 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    done = _shards_done(out)
    assert 3 <= done < 30, f"the kill should land mid-job ({done} of 30 shards done)"

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"({done * 100} done before)" in resumed.stdout
    ids = read_job(out).column("id").to_pylist()
    assert sorted(ids) == [i + 1 for i in range(3000) if i != 1234]
    assert [e["id"] for e in errors_of(out)] == [1235]
    assert not list(out.glob("*.tmp")) and sorted(p.name for p in out.iterdir() if p.suffix == ".parquet") == [
        f"part-{k:05d}.parquet" for k in range(30)]


def test_other_model_or_options_refused_same_job_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    import onnx

    (tmp_path / "docs.txt").write_text("\n".join(texts(20)) + "\n")
    out = tmp_path / "out"
    assert bulk(tmp_path / "docs.txt", "--model", "demo-text", "--out", out) == 0
    before = read_job(out)
    capsys.readouterr()

    changed = onnx.load(str(DEMO_MODELS / "demo-text.onnx"))
    changed.doc_string = "retrained"
    onnx.save(changed, str(tmp_path / "demo-text.onnx"))
    assert bulk(tmp_path / "docs.txt", "--model", tmp_path / "demo-text.onnx", "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds another job" in err and "sha256" in err

    assert bulk(tmp_path / "docs.txt", "--model", "demo-text", "--out", out, "--pooling", "cls") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pooling" in err

    assert bulk(tmp_path / "docs.txt", "--model", "demo-text", "--out", out) == 0  # the same job: nothing to do
    assert "0 items, 0 errors" in capsys.readouterr().out
    assert read_job(out).equals(before)


def test_fail_fast_stops_at_the_first_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = texts(30)
    lines[9] = TOO_LONG
    (tmp_path / "docs.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert bulk(tmp_path / "docs.txt", "--model", "demo-text", "--out", out, "--fail-fast") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("d2v-bulk: 10: INVALID_ARGUMENT:")
    assert not list(out.glob("part-*.parquet"))
    assert bulk(tmp_path / "docs.txt", "--model", "demo-text", "--out", out) == 0
    assert [e["id"] for e in errors_of(out)] == [10] and read_job(out).num_rows == 29


def test_refusals_before_starting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bulk(tmp_path / "nothing", "--model", "demo-text", "--out", tmp_path / "o") == 2
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "docs.txt").write_text("hello\n")
    assert bulk(tmp_path / "docs.txt", "--model", "no-such-model", "--out", tmp_path / "o") == 2
    assert "demo models: demo-audio, demo-image, demo-text" in capsys.readouterr().err
    pq.write_table(pa.table({"n": [1, 2]}), tmp_path / "t.parquet")
    assert bulk(tmp_path / "t.parquet", "--model", "demo-text", "--out", tmp_path / "o") == 2
    assert "no column 'text'" in capsys.readouterr().err


def test_progress_off_a_terminal_is_json_lines(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from d2v_serve.bulk import job

    monkeypatch.setattr(job, "_PROGRESS_EVERY_S", 0.0)
    progress = job.Progress(total=100, done=20)
    time.sleep(0.01)
    progress.advance(30, 2)
    progress.close()
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["done"] == 50 and line["total"] == 100 and line["errors"] == 2
    assert line["items_per_s"] > 0 and line["eta_s"] == pytest.approx(50 / line["items_per_s"], abs=0.1)
