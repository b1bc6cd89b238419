"""The README's examples are the files in examples/, word for word, and they run against a live server (the demo
models) from a folder holding the files they name, with the addresses pointed at the test server's ports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from d2v_serve.cli import DEMO_MODELS
from tests.serve_fixtures import ServerThread, encode_audio, encode_image, free_port, picture, tone

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
FENCE = {".py": "python", ".sh": "bash"}


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(DEMO_MODELS, http_port=free_port()) as srv:
        yield srv


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where a user would run them: the media files they name, and .venv as the README's commands expect."""
    work = tmp_path_factory.mktemp("examples")
    (work / "speech.wav").write_bytes(encode_audio(tone(2.0), 16000, "WAV"))
    for name in ("cat.png", "photo.png"):
        (work / name).write_bytes(encode_image(picture(96, 80), "PNG"))
    (work / ".venv").symlink_to(Path(sys.executable).parent.parent)
    return work


def _run(example: str, server: ServerThread, workdir: Path) -> subprocess.CompletedProcess[str]:
    text = (EXAMPLES / example).read_text()
    text = text.replace("localhost:50051", server.target).replace("localhost:8080", server.http_url.split("//")[1])
    argv = [sys.executable, "-c", text] if example.endswith(".py") else ["bash", "-euo", "pipefail", "-c", text]
    r = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "D2V_SERVER": server.target})
    assert r.returncode == 0, r.stderr[-2000:]
    return r


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.iterdir()))
def test_readme_shows_the_example_verbatim(example: str) -> None:
    text = (EXAMPLES / example).read_text()
    assert f"```{FENCE[Path(example).suffix]}\n{text}```" in (REPO / "README.md").read_text(), example


def test_python_client(server: ServerThread, workdir: Path) -> None:
    out = _run("client.py", server, workdir).stdout.strip()
    assert out == "(64,) 2 (99, 64) (64,)", out  # 2 s of speech: 99 frames of 20 ms


def test_openai_client(server: ServerThread, workdir: Path) -> None:
    assert _run("openai_client.py", server, workdir).stdout.split() == ["2", "64"]


def test_embed_cli(server: ServerThread, workdir: Path) -> None:
    doc = json.loads(_run("embed.sh", server, workdir).stdout)
    assert [d["input"] for d in doc] == ["hello world", "another one"]
    assert all(abs(np.linalg.norm(d["embedding"]) - 1) < 1e-4 for d in doc)  # --normalize
    with np.load(workdir / "vectors.npz") as arrays:
        assert len(arrays.files) == 2 and all(arrays[k].shape == (64,) for k in arrays.files)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (scripts/test installs it)")
def test_curl(server: ServerThread, workdir: Path) -> None:
    reply = json.loads(_run("curl.sh", server, workdir).stdout)
    assert [len(item["embedding"]) for item in reply["data"]] == [64, 64]
    assert re.fullmatch(r"demo-text", reply["model"])
