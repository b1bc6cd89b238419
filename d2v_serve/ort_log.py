"""ONNX Runtime's own log, through ours. ORT's C++ logger writes coloured lines straight to file descriptor 2, which
would break a JSON log stream; it has no Python hook. So while a session is created (when ORT logs: provider
libraries, graph checks) descriptor 2 goes to a temporary file, and the ORT lines are re-emitted afterwards on the
`d2v_serve.onnxruntime` logger at their own severity. Sessions log nothing while they run (severity FATAL): run
failures reach us as exceptions anyway."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger("d2v_serve.onnxruntime")

# 2026-12-01 21:21:39.774 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] message
_LINE = re.compile(r"\[([VIWEF]):onnxruntime:[^,\]]*,\s*([^\]]*)\]\s*(.*)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LEVELS = {"V": logging.DEBUG, "I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}
_LOCK = threading.Lock()  # descriptor 2 is process-wide: one capture at a time


@dataclass
class OrtLine:
    level: int
    source: str  # ORT's file:line and function
    message: str


def parse(text: str) -> tuple[list[OrtLine], list[str]]:
    """ORT's lines in `text`, and the other lines (someone else's writes to stderr meanwhile)."""
    ort_lines: list[OrtLine] = []
    others: list[str] = []
    for raw in _ANSI.sub("", text).splitlines():
        if not raw.strip():
            continue
        m = _LINE.search(raw)
        if m:
            ort_lines.append(OrtLine(_LEVELS[m.group(1)], m.group(2), m.group(3).strip()))
        elif ort_lines and not raw.startswith("{"):  # a multi-line ORT message
            ort_lines[-1].message += " " + raw.strip()
        else:
            others.append(raw)
    return ort_lines, others


@contextlib.contextmanager
def captured(lines: list[OrtLine]) -> Iterator[None]:
    """Collect what ORT writes to stderr inside the block into `lines` (log them with `emit`)."""
    with _LOCK, tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            found, others = parse(sink.read().decode(errors="replace"))
            lines.extend(found)
            for line in others:  # not ORT's: pass through untouched
                print(line, file=sys.stderr)


def emit(lines: list[OrtLine], expected: bool = False) -> None:
    """Log ORT's lines at their severity, or at DEBUG when they are `expected` noise (e.g. the CUDA provider failing
    to load in `--device auto` mode, which one warning of ours reports)."""
    for line in lines:
        log.log(logging.DEBUG if expected else line.level, line.message, extra={"source": line.source})
