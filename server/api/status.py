"""Mapping of transport-free ``ASRError`` onto gRPC status, shared by every servicer."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import logging
from typing import Callable

import grpc

from server.errors import ASRError, ErrorCode
from server.observability.observer import Observer
from server.observability.throttled_log import ThrottledLog

log = logging.getLogger(__name__)

# Before an error status ends a stream the client is still writing to, what it keeps sending is
# read and dropped while messages follow each other closely (at most this gap, this long in all).
LET_FINISH_GAP_S = 0.03
LET_FINISH_MAX_S = 1.0


async def let_client_finish_writing(context, max_bytes: float = float("inf"),
                                    size: Callable[[object], int] = lambda message: 0) -> None:
    """Read and drop the messages a client is still sending fast (a file upload) until it half-closes,
    pauses for ``LET_FINISH_GAP_S``, ``LET_FINISH_MAX_S`` have passed or ``max_bytes`` (as ``size``
    measures each message) were read, so that the error status comes after its last write.
    grpcio's asyncio client reports a write that fails because the call has just ended as
    ``INTERNAL: Internal error from Core`` instead of the server's status (grpc/grpc#36066); a
    paced client (a microphone) pauses at once and loses no time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LET_FINISH_MAX_S
    read = 0
    try:
        while loop.time() < deadline and read < max_bytes:
            message = await asyncio.wait_for(context.read(), LET_FINISH_GAP_S)
            if message is grpc.aio.EOF:
                return
            read += size(message)
    except Exception:  # a pause (TimeoutError), the client gone, or nothing left to read
        return


_refusals = ThrottledLog(log)  # a flood of bad requests logs one line per method and code every 10 s


def token_client(authorization: str) -> str:
    """The ``--max-streams-per-client`` key of an accepted ``authorization`` value ("<scheme> <token>"):
    a digest of the token alone, so that one token is one client whatever the scheme ("Bearer",
    Deepgram's "Token") or the port (gRPC, WebSocket) that carries it."""
    token = authorization.strip().partition(" ")[2].strip()
    return "token:" + hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def client_of(context, settings) -> str:
    """Whom ``--max-streams-per-client`` charges a call to: with ``--auth-token-file``, its bearer
    token (``token_client``; the interceptor has accepted it), else its peer address without the
    port as gRPC names it ("ipv4:10.0.0.7", "ipv6:%5B::1%5D"; the WebSocket port uses the same
    names: ``server.api.websocket.address_client``)."""
    if settings.auth_token_file is not None:
        for key, value in context.invocation_metadata() or ():
            if key.lower() == "authorization":
                return token_client(value if isinstance(value, str) else value.decode("latin-1"))
    return context.peer().rpartition(":")[0]


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
            _refusals(f"{handler.__qualname__} {exc.code.name}", "%s: %s %s", handler.__qualname__,
                      exc.code.name, exc.message)
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
                if hasattr(request, "__aiter__"):  # request streaming
                    await let_client_finish_writing(context)
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
