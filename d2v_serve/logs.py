"""Structured logs: one JSON object per line on stderr (or plain text), with extra fields passed as `extra=`."""

from __future__ import annotations

import json
import logging
import sys
import time

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def extra_fields(record: logging.LogRecord) -> dict[str, object]:
    """The fields a call passed as `extra=`: not the record's own, nor the private ones other libraries' record
    factories add (Ray's `_ray_timestamp_ns`, in a process that imported it)."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(extra_fields(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """`time level logger: message key=value ...`: the message and its extra fields (which model loaded, which ports
    are open), less the full `config` object that JSON lines carry."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [f"{k}={v if isinstance(v, str | int | float | bool) else json.dumps(v, default=str)}"
                  for k, v in extra_fields(record).items() if k != "config"]
        head, sep, tail = line.partition("\n")  # a traceback stays below the fields
        return " ".join([head, *fields]) + sep + tail


def setup_logging(level: str = "info", fmt: str = "json") -> None:
    """Route the `d2v_serve` loggers (and warnings from libraries) to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("d2v_serve").setLevel(level.upper())
    logging.captureWarnings(True)  # warnings.warn from libraries: records too, not raw lines
