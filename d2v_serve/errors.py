"""Errors the service turns into gRPC statuses: a status code, a one-line reason and, for one bad input, its index."""

from __future__ import annotations

import grpc

INPUT_INDEX_KEY = "d2v-input-index"  # trailing metadata naming the bad input of a failed Embed call


class ServeError(Exception):
    """A request-level failure reported to the client as `code` with `message` (one line)."""

    def __init__(self, code: grpc.StatusCode, message: str, input_index: int = -1) -> None:
        super().__init__(message)
        self.code = code
        self.message = " ".join(message.split())
        self.input_index = input_index

    def for_input(self, index: int) -> ServeError:
        """The same error attributed to input `index` ("input 3: ...")."""
        return ServeError(self.code, f"input {index}: {self.message}", index)


def invalid_argument(message: str, input_index: int = -1) -> ServeError:
    return ServeError(grpc.StatusCode.INVALID_ARGUMENT, message, input_index)


def not_found(message: str) -> ServeError:
    return ServeError(grpc.StatusCode.NOT_FOUND, message)


def failed_precondition(message: str, input_index: int = -1) -> ServeError:
    return ServeError(grpc.StatusCode.FAILED_PRECONDITION, message, input_index)


def resource_exhausted(message: str) -> ServeError:
    return ServeError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def deadline_exceeded(message: str) -> ServeError:
    return ServeError(grpc.StatusCode.DEADLINE_EXCEEDED, message)


def unavailable(message: str) -> ServeError:
    return ServeError(grpc.StatusCode.UNAVAILABLE, message)


def shutting_down() -> ServeError:
    """A call refused by the drain, or still in flight when the grace ran out."""
    return unavailable("server is shutting down; retry on another replica")


def internal(message: str) -> ServeError:
    return ServeError(grpc.StatusCode.INTERNAL, message)
