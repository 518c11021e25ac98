"""Mapping of transport-free ``ASRError`` onto gRPC status, shared by every servicer."""

from __future__ import annotations

import functools
import inspect
import logging

import grpc

from server.errors import ASRError, ErrorCode
from server.stats import Observer

log = logging.getLogger(__name__)


def grpc_code(code: ErrorCode) -> grpc.StatusCode:
    return grpc.StatusCode[code.name]


def _observer(servicer) -> Observer:
    """The observer of the service behind ``servicer`` (servicers keep theirs as ``.service``)."""
    return getattr(getattr(servicer, "service", None), "observer", None) or Observer()


def maps_errors(handler):
    """Decorate a servicer method (unary or async-generator) so that ``ASRError`` becomes
    its gRPC status and any other exception becomes INTERNAL with a logged traceback; every
    such status is reported to the service's observer (``error_returned``)."""

    async def _abort(servicer, context, exc: Exception):
        _observer(servicer).error_returned(exc.code if isinstance(exc, ASRError) else ErrorCode.INTERNAL)
        if isinstance(exc, ASRError):
            log.info("%s: %s %s", handler.__qualname__, exc.code.name, exc.message)
            await context.abort(grpc_code(exc.code), exc.message)
        log.exception("%s failed", handler.__qualname__, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")

    if inspect.isasyncgenfunction(handler):
        @functools.wraps(handler)
        async def stream_wrapper(self, request, context):
            try:
                async for response in handler(self, request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort(self, context, exc)
        return stream_wrapper

    @functools.wraps(handler)
    async def unary_wrapper(self, request, context):
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(self, context, exc)
    return unary_wrapper
