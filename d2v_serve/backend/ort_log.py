"""ONNX Runtime's own log, through ours. ORT's C++ logger writes coloured lines straight to file descriptor 2, and its
Python wrapper print()s to stdout when it falls back from a provider that failed; both would break a JSON log
stream, and neither has a hook. So while a session is created (when ORT logs: provider libraries, graph checks,
fallbacks) descriptors 1 and 2 go to temporary files, and ORT's lines are re-emitted afterwards on the
`d2v_serve.onnxruntime` logger at their own severity (printed lines: WARNING). Sessions log nothing while they run
(severity FATAL, no silent fallback): run failures reach us as exceptions."""

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


def _printed(text: str) -> list[OrtLine]:
    """ORT's print()ed lines (its Python fallback notice), without the banners."""
    lines = [raw.strip() for raw in text.splitlines()]
    return [OrtLine(logging.WARNING, "onnxruntime python", line) for line in lines if line and set(line) != {"*"}
            and line.strip("* ") != "EP Error"]


@contextlib.contextmanager
def captured(lines: list[OrtLine]) -> Iterator[None]:
    """Collect what ORT writes to stderr and stdout inside the block into `lines` (log them with `emit`)."""
    with _LOCK, tempfile.TemporaryFile() as err_sink, tempfile.TemporaryFile() as out_sink:
        sys.stderr.flush()
        sys.stdout.flush()
        saved_err, saved_out = os.dup(2), os.dup(1)
        os.dup2(err_sink.fileno(), 2)
        os.dup2(out_sink.fileno(), 1)
        try:
            yield
        finally:
            sys.stderr.flush()
            sys.stdout.flush()
            os.dup2(saved_err, 2)
            os.dup2(saved_out, 1)
            os.close(saved_err)
            os.close(saved_out)
            err_sink.seek(0)
            out_sink.seek(0)
            found, others = parse(err_sink.read().decode(errors="replace"))
            lines.extend(found)
            lines.extend(_printed(_ANSI.sub("", out_sink.read().decode(errors="replace"))))
            for line in others:  # not ORT's: pass through untouched
                print(line, file=sys.stderr)


def emit(lines: list[OrtLine], expected: bool = False) -> None:
    """Log ORT's lines at their severity, or at DEBUG when they are `expected` noise (e.g. the CUDA provider failing
    to load in `--device auto` mode, which one warning of ours reports)."""
    for line in lines:
        log.log(logging.DEBUG if expected else line.level, line.message, extra={"source": line.source})
