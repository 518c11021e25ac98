"""Transport-free errors: every failure the service reports carries a status code.

The codes are gRPC's canonical names; only the servicer layer maps them onto
``grpc.StatusCode`` (and onto each protocol's conventions), so nothing below the
servicer imports grpc.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    CANCELLED = "CANCELLED"
    ABORTED = "ABORTED"
    INTERNAL = "INTERNAL"


class ASRError(Exception):
    """An error with a status code and a message meant for the person who sent the request."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"ASRError({self.code.name}, {self.message!r})"


def invalid(message: str) -> ASRError:
    return ASRError(ErrorCode.INVALID_ARGUMENT, message)


SHOWN_CHARACTERS = 64  # of a client's string quoted in an error message or a log line


def shown(value: object, limit: int = SHOWN_CHARACTERS) -> str:
    """``repr`` of a client-supplied string for messages and logs, cut to about ``limit`` characters
    (a megabyte model name must not become a megabyte status message or log line)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"
