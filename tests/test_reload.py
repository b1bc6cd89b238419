"""Hot model swaps on the real d2v-serve process, under steady load from outside: SIGHUP swaps a changed file in,
keeps the served version when a file is bad, waits for a file still being written, unloads a removed file; no call
fails and health stays SERVING throughout."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from d2v_serve.cli import DEMO_MODELS
from d2v_serve.client import Client, EmbedError
from tests.serve_fixtures import free_port

GOLDEN_MODELS = Path(__file__).resolve().parent / "data" / "golden" / "models"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _publish(data: bytes, path: Path, age_s: float = 10.0) -> None:
    """Write to a temporary name, date it `age_s` back (settled), and rename it into place: one step."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    past = time.time() - age_s
    os.utime(tmp, (past, past))
    os.replace(tmp, path)


def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _failed_reloads(metrics_port: int) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    for line in body.splitlines():
        if line.startswith('d2v_model_reloads_total{result="failed"}'):
            return float(line.split()[-1])
    return 0.0


def test_swaps_bad_files_partial_copies_and_removals_under_load(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    _publish((DEMO_MODELS / "demo-text.onnx").read_bytes(), models / "text.onnx")
    _publish((DEMO_MODELS / "demo-image.onnx").read_bytes(), models / "img.onnx")
    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("d2v-serve")), "--models", str(models),
                             "--host", "127.0.0.1", "--port", str(port), "--http-port", "0",
                             "--metrics-port", str(metrics_port), "--log-format", "json"],
                            stderr=subprocess.PIPE, text=True)
    target = f"127.0.0.1:{port}"
    stop, calls, failures, not_serving = threading.Event(), [0], [], []

    def load() -> None:
        with Client(target) as c:
            while not stop.is_set():
                try:
                    c.embed(["a steady stream of calls", "while the files change"], "text")
                    calls[0] += 1
                except EmbedError as exc:
                    failures.append(exc)

    def watch_health() -> None:
        with Client(target) as c:
            while not stop.is_set():
                status = c.health()
                if status != "SERVING":
                    not_serving.append(status)
                time.sleep(0.02)

    try:
        with Client(target) as c:
            def listed() -> dict[str, dict]:
                return {m["name"]: m for m in c.list_models()}

            def up() -> bool:
                try:
                    return c.health() == "SERVING"
                except EmbedError:
                    return False

            _until(up, 90, "the server to come up")
            before = listed()
            assert before["text"]["file_sha256"] == _sha256(models / "text.onnx") and before["text"]["loaded_at"] > 0
            threads = [threading.Thread(target=load) for _ in range(3)] + [threading.Thread(target=watch_health)]
            for t in threads:
                t.start()
            _until(lambda: calls[0] >= 10, 60, "steady load")

            # 1. A changed file: loaded and warmed beside the old version, then swapped in.
            new_text = (GOLDEN_MODELS / "tiny-text.onnx").read_bytes()
            _publish(new_text, models / "text.onnx")
            proc.send_signal(signal.SIGHUP)
            _until(lambda: listed()["text"]["file_sha256"] == hashlib.sha256(new_text).hexdigest(), 60, "the swap")
            swapped = listed()["text"]
            assert swapped["loaded_at"] > before["text"]["loaded_at"]
            assert c.embed("after the swap", "text").shape == (swapped["hidden_size"],)

            # 2. A bad file in place of a served one: refused, counted, the served version stays.
            _publish(b"not an onnx model", models / "text.onnx")
            proc.send_signal(signal.SIGHUP)
            _until(lambda: _failed_reloads(metrics_port) >= 1, 60, "the bad file to be refused")
            assert listed()["text"]["file_sha256"] == swapped["file_sha256"]

            # 3. A file still being copied is not loaded; once it is complete and settled, it is.
            audio = (DEMO_MODELS / "demo-audio.onnx").read_bytes()
            with (models / "late.onnx").open("wb") as f:
                f.write(audio[: len(audio) // 2])
                f.flush()
                proc.send_signal(signal.SIGHUP)
                time.sleep(1.0)
                assert "late" not in listed() and _failed_reloads(metrics_port) == 1
                f.write(audio[len(audio) // 2:])
            _until(lambda: "late" in listed(), 60, "the copied file to load after it settled")
            assert _failed_reloads(metrics_port) == 1  # the half file never counted as a failure

            # 4. A removed file: unloaded; its name is unknown from then on.
            (models / "img.onnx").unlink()
            proc.send_signal(signal.SIGHUP)
            _until(lambda: "img" not in listed(), 60, "the removal")
            with pytest.raises(EmbedError) as info:
                c.embed("text for a model that is gone", "img")
            assert info.value.code.name == "NOT_FOUND"
            served_calls = calls[0]
            _until(lambda: calls[0] > served_calls + 5, 60, "calls after the changes")
    finally:
        stop.set()
        for t in threading.enumerate():
            if t is not threading.current_thread() and t.name.startswith("Thread-"):
                t.join(30)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        logs = proc.stderr.read()
    assert failures == [] and not_serving == []
    assert code == 0
    assert logs.count('"model reload failed; the version serving stays"') == 1
    assert '"model version retired"' in logs


def test_watch_models_flag() -> None:
    from d2v_serve.config import ServerConfig, parse_config

    assert ServerConfig().watch_models == 0  # off by default: only SIGHUP
    assert parse_config(["--watch-models", "5"]).watch_models == 5
    with pytest.raises(ValueError, match="--watch-models must be >= 0"):
        parse_config(["--watch-models", "-1"])
