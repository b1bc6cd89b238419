"""Request bytes -> proto messages on the gRPC side. The servicer's methods take raw bytes (no deserializer in
the method handlers), so a frame that does not parse is INVALID_ARGUMENT with a one-line reason, never UNKNOWN with
a traceback per frame, and the auth interceptor answers before any byte is parsed."""

from __future__ import annotations

import logging
import threading
import time
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from ..errors import ServeError, invalid_argument

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)


class RateLimitedLog:
    """At most one record per `interval_s` for one kind of event; the record counts the ones left out."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self.logger, self.interval_s = logger, interval_s
        self._lock = threading.Lock()
        self._last = -float("inf")
        self._suppressed = 0

    def warning(self, msg: str, **extra: object) -> bool:
        """Log unless one was logged less than interval_s ago; True when it logged."""
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.interval_s:
                self._suppressed += 1
                return False
            suppressed, self._suppressed, self._last = self._suppressed, 0, now
        self.logger.warning(msg, extra={**extra, "suppressed_since_last": suppressed})
        return True


_malformed = RateLimitedLog(log)


def parse(raw: bytes, message_type: type[M], method: str = "") -> M:
    """`raw` as a `message_type`, or ServeError(INVALID_ARGUMENT) naming the message; logged at most every 10 s."""
    try:
        return message_type.FromString(raw)
    except (DecodeError, ValueError, RecursionError) as exc:  # upb raises DecodeError; be safe on the others
        _malformed.warning("malformed request", method=method, bytes=len(raw), reason=type(exc).__name__)
        raise malformed(message_type) from None


def malformed(message_type: type[Message]) -> ServeError:
    return invalid_argument(f"the request is not a valid {message_type.DESCRIPTOR.full_name} message")
