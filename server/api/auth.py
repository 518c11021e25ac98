"""Bearer-token authentication: one grpc.aio server interceptor in front of every service.

Every call must carry the metadata ``authorization: Bearer <token>`` with one of the
tokens of ``--auth-token-file``; otherwise it ends with ``UNAUTHENTICATED`` before any
servicer runs (no session, no model). ``grpc.health.v1.Health`` is exempt unless
``--no-auth-exempt-health`` (load-balancer probes rarely send tokens).

A refused call costs the server no parsing and bounded memory: no servicer, no session, no
protobuf parse of its messages (they are counted, as bytes, then dropped). A client still writing
when its streaming call is refused gets UNAUTHENTICATED only if the server reads what it sends
until it pauses (grpcio's asyncio client otherwise reports ``INTERNAL``, grpc/grpc#36066), so up to
``MAX_DRAINING_REFUSALS`` refused calls at a time, and ``DRAINED_REFUSALS_PER_S`` a second, are read
for up to ``REFUSAL_DRAIN_BYTES`` each; the others (a flood) are refused without reading a message.

Refusals are paced per client address (``RefusalPacer``): each costs the server about a millisecond
of its event loop (grpc.aio's call machinery, not this check), which every stream shares, so past
``FREE_REFUSALS_PER_S`` a second from one address a refused call waits ``PACED_REFUSAL_DELAY_S``
before its status (by at most ``MAX_PACED_REFUSALS`` calls at a time; beyond that, at once). A
flood of callers that re-open their call when it ends then costs one refusal per caller and delay,
not one per round trip; an authorised call is never delayed.

Tokens are compared in constant time: the server keeps only their SHA-256 digests and
compares the presented token's digest with every one of them (``hmac.compare_digest``,
no early exit), so neither content nor length leaks through timing. No token, accepted
or refused, is ever logged or put into a metric or a status message.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from typing import Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health_pb2

from server.api.status import let_client_finish_writing
from server.errors import ErrorCode
from server.observability.observer import Observer
from server.observability.throttled_log import ThrottledLog
from server.types import LimitReason, StreamOutcome

log = logging.getLogger(__name__)

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# Recognition RPCs (counted as streams refused) by service: the ``api`` label of the metrics.
STREAM_APIS = {"asr.v1.SpeechRecognition": "asr.v1", "nvidia.riva.asr.RivaSpeechRecognition": "riva",
               "google.cloud.speech.v1.Speech": "google"}
STREAM_METHODS = ("StreamingRecognize", "Recognize")
# A refused streaming call is read (never parsed) for up to this many bytes before its status, so that
# a client still writing sees UNAUTHENTICATED (grpc/grpc#36066), by at most this many calls at a time;
# past that (a flood) calls are refused unread.
REFUSAL_DRAIN_BYTES = 256 * 1024
MAX_DRAINING_REFUSALS = 4
DRAINED_REFUSALS_PER_S = 2.0
# Refusals one client address gets at once each second; past that its refused calls wait before
# their status, by at most this many at a time (the rest are answered at once).
FREE_REFUSALS_PER_S = 20.0
PACED_REFUSAL_DELAY_S = 1.0
MAX_PACED_REFUSALS = 256




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
        self._log = ThrottledLog(log)  # one line per method and reason every 10 s, not per call
        self._drains = DrainBudget(MAX_DRAINING_REFUSALS, DRAINED_REFUSALS_PER_S)
        self._pacer = RefusalPacer(FREE_REFUSALS_PER_S, PACED_REFUSAL_DELAY_S, MAX_PACED_REFUSALS)

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
        self._log(f"{handler_call_details.method}: {problem}", "refused %s: %s", handler_call_details.method,
                  problem)
        return _refusing(handler, problem, self._drains, self._pacer)

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


class DrainBudget:
    """Which refused streaming calls are read before their status: at most ``concurrent`` at a
    time and ``per_second`` on average (a token bucket holding up to ``concurrent``)."""

    def __init__(self, concurrent: int, per_second: float, clock: Callable[[], float] = time.monotonic):
        self.concurrent, self.per_second, self.clock = concurrent, per_second, clock
        self.active = 0
        self._tokens = float(concurrent)
        self._at = clock()

    def take(self) -> bool:
        now = self.clock()
        self._tokens = min(float(self.concurrent), self._tokens + (now - self._at) * self.per_second)
        self._at = now
        if self.active >= self.concurrent or self._tokens < 1:
            return False
        self._tokens -= 1
        self.active += 1
        return True

    def give_back(self) -> None:
        self.active -= 1


class RefusalPacer:
    """Whether a refused call waits before its status: per client address a token bucket of
    ``free_per_s`` refusals a second (as many at once); past it, ``delay_s``, by at most ``max_held``
    calls at a time over all addresses."""

    def __init__(self, free_per_s: float, delay_s: float, max_held: int, clock: Callable[[], float] = time.monotonic):
        self.free_per_s, self.delay_s, self.max_held, self.clock = free_per_s, delay_s, max_held, clock
        self.held = 0
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, when)
        self._pruned_at = clock()

    def take(self, address: str) -> bool:
        """True when this refusal is to wait (then ``give_back`` after it)."""
        now = self.clock()
        tokens, at = self._buckets.get(address, (self.free_per_s, now))
        tokens = min(self.free_per_s, tokens + (now - at) * self.free_per_s)
        if len(self._buckets) > 4096 and now - self._pruned_at >= 1.0:  # forget refilled buckets
            self._pruned_at, full = now, self.free_per_s
            self._buckets = {a: (t, w) for a, (t, w) in self._buckets.items()
                             if t + (now - w) * self.free_per_s < full}
        if tokens >= 1:
            self._buckets[address] = (tokens - 1, now)
            return False
        self._buckets[address] = (tokens, now)
        if self.held >= self.max_held:
            return False
        self.held += 1
        return True

    def give_back(self) -> None:
        self.held -= 1


def peer_address(peer: str) -> str:
    """``ipv4:10.0.0.1:5000`` -> ``ipv4:10.0.0.1``, ``ipv6:[::1]:5000`` -> ``ipv6:[::1]`` (others as given)."""
    return peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer


def _refusing(handler: grpc.RpcMethodHandler, message: str, drains: DrainBudget,
              pacer: RefusalPacer) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that ends the call with UNAUTHENTICATED, parsing nothing
    (``drains``: whether a streaming call is read first; ``pacer``: whether it waits; module docstring)."""

    async def refuse(request_or_iterator, context: grpc.aio.ServicerContext) -> None:
        if handler.request_streaming and drains.take():
            try:  # messages arrive as their length (the deserializer is ``len``)
                await let_client_finish_writing(context, REFUSAL_DRAIN_BYTES, size=lambda n: n)
            finally:
                drains.give_back()
        elif pacer.take(peer_address(context.peer() or "")):
            try:
                await asyncio.sleep(pacer.delay_s)
            finally:
                pacer.give_back()
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler,
             (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(refuse, request_deserializer=len,
                response_serializer=handler.response_serializer)
