"""Bearer-token authentication: one grpc.aio server interceptor in front of every service.

Every call must carry the metadata ``authorization: Bearer <token>`` with one of the
tokens of ``--auth-token-file``; otherwise it ends with ``UNAUTHENTICATED`` before any
servicer runs (no session, no model). ``grpc.health.v1.Health`` is exempt unless
``--no-auth-exempt-health`` (load-balancer probes rarely send tokens).

Tokens are compared in constant time: the server keeps only their SHA-256 digests and
compares the presented token's digest with every one of them (``hmac.compare_digest``,
no early exit), so neither content nor length leaks through timing. No token, accepted
or refused, is ever logged or put into a metric or a status message.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path
from typing import Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health_pb2

from server.api.status import let_client_finish_writing
from server.errors import ErrorCode
from server.stats import LimitReason, Observer, StreamOutcome

log = logging.getLogger(__name__)

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
MIN_TOKEN_LENGTH = 16
# Recognition RPCs (counted as streams refused) by service: the ``api`` label of the metrics.
STREAM_APIS = {"asr.v1.SpeechRecognition": "asr.v1", "nvidia.riva.asr.RivaSpeechRecognition": "riva",
               "google.cloud.speech.v1.Speech": "google"}
STREAM_METHODS = ("StreamingRecognize", "Recognize")


def read_tokens(path: Path) -> list[str]:
    """The tokens of a token file: one per line, blank lines and ``#`` comments ignored.
    Raises ``ValueError`` naming the line (never its content) for a malformed token."""
    tokens = []
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--auth-token-file {str(path)!r} cannot be read: {type(exc).__name__}") from None
    for number, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if not (token.isascii() and token.isprintable()) or any(ch.isspace() for ch in token):
            raise ValueError(f"--auth-token-file line {number}: a token is printable ASCII without spaces")
        if len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(f"--auth-token-file line {number}: a token needs at least {MIN_TOKEN_LENGTH} "
                             f"characters")
        tokens.append(token)
    if not tokens:
        raise ValueError(f"--auth-token-file {str(path)!r} holds no token")
    return tokens


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without an accepted bearer token with ``UNAUTHENTICATED``."""

    def __init__(self, tokens: Iterable[str], exempt_services: Iterable[str] = (HEALTH_SERVICE,),
                 observer: Observer | None = None):
        self._digests = [_digest(t) for t in tokens]
        if not self._digests:
            raise ValueError("no token to accept")
        self.exempt = frozenset(exempt_services)
        self.observer = observer or Observer()

    def accepts(self, token: str) -> bool:
        """Whether ``token`` is one of the accepted ones (constant time over all of them)."""
        presented = _digest(token)
        ok = False
        for digest in self._digests:
            ok |= hmac.compare_digest(presented, digest)
        return ok

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable],
                                handler_call_details: grpc.HandlerCallDetails):
        service, _, method = handler_call_details.method.lstrip("/").partition("/")
        if service in self.exempt:
            return await continuation(handler_call_details)
        problem = self._problem(handler_call_details.invocation_metadata or ())
        if problem is None:
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)  # a lookup only: nothing runs
        if handler is None:
            return None  # unknown method: UNIMPLEMENTED, as without auth
        self.observer.limit_hit(LimitReason.AUTH)
        self.observer.error_returned(ErrorCode.UNAUTHENTICATED)
        if service in STREAM_APIS and method in STREAM_METHODS:
            self.observer.stream_ended(STREAM_APIS[service], StreamOutcome.REJECTED, None)
        log.info("refused %s: %s", handler_call_details.method, problem)
        return _refusing(handler, problem)

    def _problem(self, metadata) -> str | None:
        """None when the call carries an accepted token, else what is wrong (no token in it)."""
        values = [value for key, value in metadata if key.lower() == "authorization"]
        if not values:
            return "missing credentials: send the metadata 'authorization: Bearer <token>'"
        value = values[0] if isinstance(values[0], str) else values[0].decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "malformed credentials: the authorization metadata must be 'Bearer <token>'"
        if len(values) > 1:
            return "more than one authorization metadata entry"
        if not self.accepts(token.strip()):
            return "invalid bearer token"
        return None


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that ends the call with UNAUTHENTICATED at once."""

    async def refuse(request_or_iterator, context: grpc.aio.ServicerContext) -> None:
        if handler.request_streaming:
            await let_client_finish_writing(context)  # unread, dropped: see its docstring
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler,
             (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
