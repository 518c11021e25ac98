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
