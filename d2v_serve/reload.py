"""Hot model swaps: SIGHUP (or every --watch-models seconds) re-reads --models while the server keeps serving.

A pass looks at every *.onnx file. A new or changed one (its SHA-256 differs from the version served) is loaded,
validated and warmed up beside the version serving, then swapped in with one assignment of the models' dict; calls
already admitted finish on the version that admitted them, and the old version's worker stops once its calls are
done. A file that disappeared is unloaded the same way. A file that fails to load or warm up changes nothing: the
old version keeps serving, one log line says why and `d2v_model_reloads_total{result="failed"}` counts it (once:
that file is tried again when it changes). A file
modified in the last SETTLE_S seconds, or while it was read, may still be being copied: it waits for a later pass
(scheduled by this one). Copying to a name that does not end in .onnx and renaming it is the way to publish a
file in one step.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import metrics
from .backend.runner import RuntimeSettings
from .models.registry import Model, file_sha256, load_model, runtime_settings, start_worker

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger(__name__)
SETTLE_S = 2.0  # a file modified more recently than this may still be being written


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


class ModelReloader:
    """The server's reload passes: at most one at a time, each on the event loop (loading runs in threads)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()  # passes asked for and versions retiring
        self._refused: dict[Path, tuple[int, int]] = {}  # files that failed, as they were: not retried until changed

    def request(self) -> None:
        """Ask for a pass (a signal handler, the watch loop, a pass that found a file still being written)."""
        self._keep(asyncio.get_running_loop().create_task(self.reload()))

    async def watch(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            await self.reload()

    async def reload(self) -> dict[str, list[str]]:
        """One pass; returns the model names by outcome (loaded, replaced, unloaded, failed, waiting)."""
        async with self._lock:
            if not self.server.serving:  # starting, draining or down: the pass would race the lifecycle
                return {}
            return await self._pass()

    async def close(self, timeout: float) -> None:
        """Wait for retiring versions to stop (the server is draining: their calls are ending)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    async def _pass(self) -> dict[str, list[str]]:
        server = self.server
        current = server.models
        outcome: dict[str, list[str]] = {k: [] for k in ("loaded", "replaced", "unloaded", "failed", "waiting")}
        try:
            files = {p.stem: p for p in sorted(server.models_dir.glob("*.onnx")) if p.is_file()}
        except OSError as exc:
            log.warning("model reload skipped: cannot list the model directory", extra={"error": str(exc)})
            return outcome
        if not files:  # an emptied (or unmounted) folder never takes every model away
            log.warning("model reload skipped: no *.onnx files", extra={"directory": str(server.models_dir)})
            return outcome
        settings = runtime_settings(server.config, len(files))
        new = dict(current)
        for name, path in files.items():
            result = await self._consider(name, path, current.get(name), settings, new)
            if result:
                outcome[result].append(name)
        for name in [n for n in current if n not in files]:
            del new[name]
            outcome["unloaded"].append(name)
        changed = [n for k in ("loaded", "replaced", "unloaded") for n in outcome[k]]
        if changed:
            server.publish(new)
            for name in outcome["loaded"] + outcome["replaced"]:
                await server.set_model_health(name, serving=True)
            for name in outcome["unloaded"]:
                await server.set_model_health(name, serving=False)
            for name in outcome["replaced"] + outcome["unloaded"]:
                self._keep(asyncio.get_running_loop().create_task(self._retire(current[name])))
            for result in ("loaded", "replaced", "unloaded"):
                metrics.MODEL_RELOADS.labels(result).inc(len(outcome[result]))
            log.info("models reloaded", extra={k: v for k, v in outcome.items() if v})
        if outcome["waiting"]:
            asyncio.get_running_loop().call_later(SETTLE_S, self.request)
        return outcome

    async def _consider(self, name: str, path: Path, old: Model | None, settings: RuntimeSettings,
                        new: dict[str, Model]) -> str:
        """Load `path` into `new` when it is a new version; returns its outcome ('' when unchanged)."""
        try:
            stamp = _stamp(path)
            if (old is not None and stamp == old.file_stamp) or self._refused.get(path) == stamp:
                return ""
            if time.time_ns() - stamp[1] < SETTLE_S * 1e9:
                return "waiting"
            digest = await asyncio.to_thread(file_sha256, path)
            if _stamp(path) != stamp:  # written to while it was read
                return "waiting"
        except OSError:  # removed or replaced mid-pass: the next pass sees what is there
            return "waiting"
        if old is not None and digest == old.sha256:
            old.file_stamp = stamp  # touched, same bytes
            return ""
        model: Model | None = None
        try:
            model = await asyncio.to_thread(load_model, path, self.server.config, settings, digest)
            await asyncio.wrap_future(start_worker(model, self.server.config, self.server.on_worker_death))
        except Exception as exc:  # noqa: BLE001 - any failure leaves the served version as it is
            if model is not None and model.batcher is not None:
                await asyncio.to_thread(model.batcher.close, 1.0)
            self._refused[path] = stamp
            metrics.MODEL_RELOADS.labels("failed").inc()
            log.warning("model reload failed; the version serving stays" if old else "new model failed to load",
                        extra={"model": name, "file": os.fspath(path), "error": " ".join(str(exc).split())[:300]})
            return "failed"
        new[name] = model
        return "replaced" if old is not None else "loaded"

    async def _retire(self, model: Model) -> None:
        """Stop a version that is no longer served once the calls it admitted are done."""
        while model.calls:
            await asyncio.sleep(0.05)
        if model.batcher is not None:
            await asyncio.to_thread(model.batcher.close, self.server.config.shutdown_grace_s)
        log.info("model version retired", extra={"model": model.name, "sha256": model.sha256[:12]})

    def _keep(self, task: asyncio.Task) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
