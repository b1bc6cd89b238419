"""What a new user trips over first: the client's str-vs-file rule, install noise, log lines, the scripts' paths, and
the one-line errors that name the way out."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest

from d2v_serve.cli import DEMO_MODELS
from d2v_serve.client import to_input
from d2v_serve.logs import TextFormatter
from tests.serve_fixtures import ServerThread, encode_audio, free_port, tone

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(argv: list[str], cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)


# ---- the client: a str is text, a Path is a file -------------------------------------------------------------


def test_a_str_naming_a_media_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "speech.wav").write_bytes(encode_audio(tone(0.5), 16000, "WAV"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"Path\('speech.wav'\)"):
        to_input("speech.wav")
    assert to_input(Path("speech.wav")).WhichOneof("kind") == "audio"
    # text stays text: no such file, not a media suffix, or words around the name
    for text in ("missing.wav", "notes.txt", "play speech.wav", "speech.wav is a file"):
        assert to_input(text).text == text


# ---- install: no warnings about the project's own package configuration ----------------------------------------


def test_wheel_builds_without_package_configuration_warnings(tmp_path: Path) -> None:
    source = tmp_path / "src"  # a copy: setuptools builds in the source tree (build/), which stays clean
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "__pycache__", "*.egg-info",
                                                                ".pytest_cache", ".ruff_cache", "runs"))
    r = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
              str(source)], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout + r.stderr
    assert "absent from the `packages` configuration" not in out and "Package would be ignored" not in out, out
    names = zipfile.ZipFile(next(tmp_path.glob("d2v-*.whl"))).namelist()
    assert {f"d2v_serve/demo_models/{p.name}" for p in DEMO_MODELS.glob("*.onnx")} <= set(names)


# ---- scripts: the editable install, and paths from the caller's directory --------------------------------------


def _editable_here(venv_root: Path, direct_url: dict) -> bool:
    info = venv_root / ".venv/lib/python3.99/site-packages/d2v-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "direct_url.json").write_text(json.dumps(direct_url))
    r = _run(["bash", "-c", f"source {REPO}/scripts/bootstrap.sh && editable_here"], cwd=venv_root)
    return r.returncode == 0


def test_bootstrap_notices_a_non_editable_install(tmp_path: Path) -> None:
    here, copy, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert _editable_here(here, {"dir_info": {"editable": True}, "url": f"file://{here}"})
    assert not _editable_here(copy, {"dir_info": {}, "url": f"file://{copy}"})  # what `pip install .` leaves
    assert not _editable_here(other, {"dir_info": {"editable": True}, "url": f"file://{tmp_path}/elsewhere"})


def test_scripts_serve_reads_models_from_the_callers_directory(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()  # empty: the server refuses it by the path it was given
    r = _run(["bash", str(REPO / "scripts/serve"), "--models", "./models", "--port", "0", "--http-port", "0",
              "--metrics-port", "0"], cwd=tmp_path, timeout=400)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last == "d2v-serve: no *.onnx model files in models", last  # not "model directory ... does not exist"


# ---- log lines in text format ----------------------------------------------------------------------------------


def test_text_logs_keep_the_fields() -> None:
    record = logging.makeLogRecord({"name": "d2v_serve.server", "levelno": logging.INFO, "levelname": "INFO",
                                    "msg": "listening", "port": 50051, "http_port": 8080, "models": ["demo-text"],
                                    "config": {"port": 50051}})
    line = TextFormatter().format(record)
    assert line.endswith('listening port=50051 http_port=8080 models=["demo-text"]'), line


# ---- one-line errors that name the way out -----------------------------------------------------------------------


def test_a_busy_port_names_its_flag() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        free = [str(free_port()) for _ in range(3)]
        for flag, argv in (("--port", ["--port", str(port), "--http-port", "0", "--metrics-port", "0"]),
                           ("--http-port", ["--port", free[0], "--http-port", str(port), "--metrics-port", "0"]),
                           ("--metrics-port", ["--port", free[1], "--http-port", "0", "--metrics-port", str(port)])):
            r = _run([str(BIN / "d2v-serve"), "--host", "127.0.0.1", *argv])
            assert r.returncode == 1 and flag in r.stderr.strip().splitlines()[-1], r.stderr[-600:]


def test_export_of_a_foreign_pickle_gives_no_unsafe_advice(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.pt"
    script = ("import torch, fractions, sys; torch.save({'x': fractions.Fraction(1, 3)}, sys.argv[1])")
    subprocess.run([sys.executable, "-c", script, str(foreign)], check=True, timeout=120)
    r = _run([str(BIN / "d2v-export"), str(foreign), "-o", str(tmp_path / "m.onnx")])
    assert r.returncode != 0 and "not a readable d2v checkpoint" in r.stderr
    assert "weights_only" not in r.stderr, r.stderr


def test_embed_of_a_text_file_suggests_text(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello\n")
    r = _run([str(BIN / "d2v-embed"), str(tmp_path / "notes.txt"), "--server", "127.0.0.1:1"])
    assert r.returncode != 0 and "--text" in r.stderr, r.stderr


def test_import_hf_of_a_hub_id_says_it_downloads_nothing(tmp_path: Path) -> None:
    r = _run([str(BIN / "d2v-import-hf"), "facebook/data2vec-text-base", "-o", str(tmp_path / "c.pt")], cwd=tmp_path)
    assert r.returncode != 0 and "downloads nothing" in r.stderr and "local" in r.stderr, r.stderr


def test_train_help_and_success_message(tmp_path: Path) -> None:
    help_text = _run([str(BIN / "d2v-train"), "--help"]).stdout
    assert "the flags below" not in help_text
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"sentence number {i} about a small corpus\n" for i in range(64)))
    r = _run([str(BIN / "d2v-train"), "--modality", "text", "--data", str(corpus), "--steps", "2", "--batch-size",
              "4", "--out", str(tmp_path / "run"), "--no-progress", "--device", "cpu"], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"checkpoint {tmp_path / 'run' / 'ckpt.pt'}" in r.stderr.strip().splitlines()[-1]


def test_root_points_to_the_docs(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret")
    with ServerThread(DEMO_MODELS, http_port=free_port(), auth_token_file=str(token)) as srv:
        with urllib.request.urlopen(f"{srv.http_url}/", timeout=30) as reply:  # no token needed for the pointer
            body = json.loads(reply.read())
    assert body["docs"] == "/docs" and body["embeddings"] == "/v1/embeddings"

