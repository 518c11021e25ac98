"""The WebSocket listener (``--ws-port``): OpenAI Realtime transcription and Deepgram live streaming.

One ``websockets`` server on ``--host`` / ``--ws-port`` (TLS with ``--tls-cert``, the bearer tokens
of ``--auth-token-file``) routes a connection by its path to a protocol adapter
(``server/api/openai_realtime.py`` at ``/v1/realtime``, ``server/api/deepgram.py`` at
``/v1/listen``). The adapters drive the same ``RecognitionService`` sessions as the gRPC
protocols, so admission, limits, drain and metrics (``api`` labels ``openai`` and ``deepgram``)
are the gRPC ones.

The opening handshake does what can be refused over HTTP, before any WebSocket exists: the path
(404), the token (401), the protocol's query parameters (400, the protocol's error body naming the
parameter) and admission (429 at the stream limit or over load, 503 while draining or starting).
A connection is then one stream: the session admitted at the handshake takes its audio. A
protocol's "commit" / "Finalize" ends that session's input (its last result is final) and the
audio after it goes to a new session of the same connection (admitted again): ``Segments``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import ssl
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from server.api import browser
from server.api.compat import AudioIntake
from server.api.status import token_client
from server.config import ServerSettings
from server.core.service import RecognitionService
from server.core.session import Session
from server.errors import ASRError, ErrorCode
from server.observability.observer import Observer
from server.observability.throttled_log import ThrottledLog
from server.types import LimitReason, StreamOutcome

log = logging.getLogger(__name__)

HTTP_STATUS = {ErrorCode.INVALID_ARGUMENT: 400, ErrorCode.FAILED_PRECONDITION: 400, ErrorCode.OUT_OF_RANGE: 400,
               ErrorCode.UNAUTHENTICATED: 401, ErrorCode.RESOURCE_EXHAUSTED: 429, ErrorCode.UNAVAILABLE: 503}
# WebSocket close codes (RFC 6455 / IANA) for a stream that ends with an error
CLOSE_CODE = {ErrorCode.INVALID_ARGUMENT: 1008, ErrorCode.FAILED_PRECONDITION: 1008, ErrorCode.OUT_OF_RANGE: 1008,
              ErrorCode.UNAUTHENTICATED: 1008, ErrorCode.RESOURCE_EXHAUSTED: 1013, ErrorCode.UNAVAILABLE: 1001,
              ErrorCode.CANCELLED: 1000}
NORMAL_CLOSE = 1000
PING_INTERVAL_S = 20.0


def close_reason(message: str) -> str:
    """``message`` cut to fit a close frame (123 bytes of UTF-8)."""
    data = message.encode()
    return message if len(data) <= 123 else data[:120].decode(errors="ignore") + "..."


def http_status(code: ErrorCode) -> int:
    return HTTP_STATUS.get(code, 500)


def close_code(code: ErrorCode) -> int:
    return CLOSE_CODE.get(code, 1011)


class WsProtocol(Protocol):
    """What a protocol adapter module provides (``openai_realtime``, ``deepgram``)."""

    API: str  # the metrics' ``api`` label
    PATH: str
    AUTH_SCHEMES: tuple[str, ...]  # Authorization schemes accepted besides "bearer"

    def prepare(self, service: RecognitionService, query: dict[str, list[str]]) -> Any:
        """Check the handshake's query parameters (ASRError naming one); the connection's options."""

    def http_error(self, connection: ServerConnection, error: ASRError) -> Response:
        """The handshake's refusal, in the protocol's own words."""

    async def serve(self, stream: "WsStream", options: Any) -> None:
        """Run one connection."""


def json_response(connection: ServerConnection, status: int, body: dict, headers: dict | None = None) -> Response:
    response = connection.respond(status, json.dumps(body) + "\n")
    response.headers["Content-Type"] = "application/json"
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def address_client(host: str) -> str:
    """The ``--max-streams-per-client`` key of a peer address, named as gRPC names its peers
    (``server.api.status.client_of``: "ipv4:10.0.0.7", "ipv6:%5B::1%5D", an IPv4-mapped IPv6
    address as IPv4), so that a client's streams on both ports count against one quota."""
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return f"ipv4:{ip}" if ip.version == 4 else f"ipv6:%5B{host}%5D"


def server_ssl_context(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    """TLS of the WebSocket port: the gRPC port's certificate, key and client CA (mutual TLS)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(Path(cert).expanduser(), Path(key).expanduser())
    if client_ca is not None:
        context.load_verify_locations(Path(client_ca).expanduser())
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@dataclass
class _Accepted:
    protocol: Any
    options: Any
    session: Session
    client: str
    browser: bool = False  # the request came from a browser page (it has an Origin)
    taken: bool = False  # the handler owns the session now


class WebSocketListener:
    """The ``--ws-port`` server. ``start`` binds the port (refusing every handshake with 503 until
    ``service`` is set), ``stop`` closes every connection (1001) and the port."""

    def __init__(self, settings: ServerSettings, tokens: Iterable[str] | None, protocols: Iterable[Any],
                 observer: Observer | None = None):
        """``protocols``: the adapter modules (``server.api.openai_realtime``, ``server.api.deepgram``),
        each with its ``PATH``; they import this module, so the caller passes them in."""
        self.settings = settings
        self.observer = observer or Observer()
        self._digests = [_digest(t) for t in tokens] if tokens is not None else None
        self.protocols = {p.PATH: p for p in protocols}
        self.service: RecognitionService | None = None
        self.server: Server | None = None
        self.port = 0
        self._log = ThrottledLog(log)
        self._watchers: set[asyncio.Task] = set()
        self.browser = browser  # browser-safe tokens, origins, the page
        self.grants = browser.Grants(tokens, settings.ws_token_ttl_seconds)
        self.origins = browser.OriginPolicy(settings.ws_allow_origin, tls=bool(settings.tls_cert))

    async def start(self) -> int:
        s = self.settings
        context = server_ssl_context(s.tls_cert, s.tls_key, s.tls_client_ca) if s.tls_cert else None
        try:
            self.server = await serve(
                self._handle, s.host, s.ws_port, process_request=self._process_request, ssl=context,
                # a message may carry --max-message-bytes of audio, base64 in JSON for OpenAI (4/3);
                # the adapters check the limit themselves (counted), this bounds what reaches them
                max_size=2 * s.max_message_bytes + 4096, compression=None,
                ping_interval=PING_INTERVAL_S, ping_timeout=PING_INTERVAL_S, server_header=None,
                create_connection=self.browser.HttpServerConnection,  # token requests (POST) too
                select_subprotocol=lambda _, offered: self.browser.select_subprotocol(offered))
        except OSError as exc:
            raise OSError(f"cannot listen on {s.host}:{s.ws_port} (--host / --ws-port): {exc}") from None
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close(close_connections=True)
            await self.server.wait_closed()
            self.server = None
        for task in list(self._watchers):
            task.cancel()

    # --- handshake -------------------------------------------------------------------------
    def _authorize(self, headers: Headers, protocol) -> str:
        """The client key of ``--max-streams-per-client`` for an authorised request; ASRError
        UNAUTHENTICATED otherwise. The credential comes in ``Authorization`` or, from a browser,
        in ``Sec-WebSocket-Protocol`` (``server.api.browser``): an ``--auth-token-file`` token
        (compared in constant time over all of them) or a token minted by a grant request
        (single use, charged to the key that minted it)."""
        if self._digests is None:
            return ""
        values = headers.get_all("Authorization")
        if len(values) > 1:
            raise ASRError(ErrorCode.UNAUTHENTICATED, "more than one Authorization header")
        if values:
            scheme, _, token = values[0].strip().partition(" ")
            scheme, token = scheme.lower(), token.strip()
            if scheme not in ("bearer", *protocol.AUTH_SCHEMES) or not token:
                raise ASRError(ErrorCode.UNAUTHENTICATED, "malformed credentials: the Authorization header "
                               "must be 'Bearer <token>'")
        else:
            offered = self.browser.subprotocol_credential(self.browser.subprotocols(headers))
            if offered is None:
                raise ASRError(ErrorCode.UNAUTHENTICATED, "missing credentials: send the header "
                               "'Authorization: Bearer <token>', or from a browser a token in the WebSocket "
                               "subprotocols (['bearer', TOKEN] from POST /v1/auth/grant; docs/operations.md)")
            scheme, token = offered
        if self.browser.Grants.is_grant(token):
            return self.grants.redeem(token, protocol.API)
        return self._api_key_client(token)

    def _api_key_client(self, token: str) -> str:
        presented, ok = _digest(token), False
        for digest in self._digests or ():
            ok |= hmac.compare_digest(presented, digest)
        if not ok:
            raise ASRError(ErrorCode.UNAUTHENTICATED, "invalid bearer token")
        return token_client("Bearer " + token)

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path, _, query = request.path.partition("?")
        if self.browser.request_method(request) != "GET" or path in self.browser.PAGES or path == "/api/status":
            return self._http(connection, request, path)
        protocol = self.protocols.get(path.rstrip("/"))
        if protocol is None:
            return connection.respond(404, f"no WebSocket API at this path; this server serves "
                                      f"{' and '.join(sorted(self.protocols))}\n")
        session = None
        try:
            if self.service is None:
                raise ASRError(ErrorCode.UNAVAILABLE, "the server is starting; retry shortly")
            try:
                refusal = self.origins.refusal(request.headers)
                if refusal:
                    raise ASRError(ErrorCode.UNAUTHENTICATED, refusal)
                client = self._authorize(request.headers, protocol)
            except ASRError:
                self.observer.limit_hit(LimitReason.AUTH)
                self.observer.stream_ended(protocol.API, StreamOutcome.REJECTED, None)
                raise
            if not client:
                client = address_client(str((connection.remote_address or ("",))[0]))
            session = self.service.open_session(protocol.API, client)  # admission (counted)
            options = protocol.prepare(self.service, urllib.parse.parse_qs(query, keep_blank_values=True))
        except ASRError as exc:
            if session is not None:
                self.service.close_session(session, exc)
            self.observer.error_returned(exc.code)
            self._log(f"{protocol.API} {exc.code.name}", "refused a %s connection: %s %s", protocol.API,
                      exc.code.name, exc.message)
            if "Origin" in request.headers:
                # a browser sees no HTTP status of a handshake: it gets the protocol's error message
                # and a close frame with the reason instead (no session is opened)
                connection.asr_refused = (protocol, exc)
                return None
            return protocol.http_error(connection, exc)
        accepted = _Accepted(protocol, options, session, client, browser="Origin" in request.headers)
        connection.asr_accepted = accepted
        # A handshake that fails after this (the client gone) never reaches the handler: free the session.
        watcher = asyncio.get_running_loop().create_task(self._free_if_unused(connection, accepted))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return None

    # --- plain HTTP: the page, its status, token grants ----------------------------------------
    def _http(self, connection: ServerConnection, request: Request, path: str) -> Response:
        b = self.browser
        method, origin = b.request_method(request), request.headers.get("Origin")
        refusal = self.origins.refusal(request.headers)
        if refusal:
            self.observer.limit_hit(LimitReason.AUTH)
            return b.http_response(403, {"error": refusal})
        cors = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"} if origin else {}
        if method == "OPTIONS":  # CORS preflight of a listed origin's token request
            return b.http_response(204, b"", headers={
                **cors, "Access-Control-Allow-Methods": "GET, POST", "Access-Control-Max-Age": "600",
                "Access-Control-Allow-Headers": "Authorization, Content-Type"})
        if method == "GET":
            if path == "/api/status":
                return b.http_response(200, self._status(), headers=cors)
            return b.static_page(path)
        grants = {"/v1/auth/grant": self.protocols.get("/v1/listen"),
                  "/v1/realtime/transcription_sessions": self.protocols.get("/v1/realtime")}
        protocol = grants.get(path.rstrip("/"))
        if protocol is None:
            return b.http_response(404, {"error": f"no {method} endpoint at this path; token grants are POST "
                                                  f"{' and POST '.join(sorted(grants))}"}, headers=cors)
        try:
            if self.service is None:
                raise ASRError(ErrorCode.UNAVAILABLE, "the server is starting; retry shortly")
            client = self._grant_client(request, connection)
            body = protocol.grant(self.grants, client, b.request_json(request), self.service)
        except ASRError as exc:
            if exc.code is ErrorCode.UNAUTHENTICATED:
                self.observer.limit_hit(LimitReason.AUTH)
            self._log(f"grant {exc.code.name}", "refused a %s token request: %s %s", protocol.API, exc.code.name,
                      exc.message)
            response = protocol.http_error(connection, exc)
            for key, value in cors.items():
                response.headers[key] = value
            return response
        return b.http_response(200, body, headers=cors)

    def _grant_client(self, request: Request, connection: ServerConnection) -> str:
        """Whom a token request's tokens are charged to: its API key (``Authorization``; a minted
        token cannot mint more), or its address without ``--auth-token-file``."""
        if self._digests is None:
            return address_client(str((connection.remote_address or ("",))[0]))
        values = request.headers.get_all("Authorization")
        if len(values) != 1:
            raise ASRError(ErrorCode.UNAUTHENTICATED, "a token request needs one header 'Authorization: Token "
                           "<key>' (Deepgram) or 'Authorization: Bearer <key>' with a key of --auth-token-file")
        scheme, _, token = values[0].strip().partition(" ")
        if scheme.lower() not in ("bearer", "token") or not token.strip() or self.browser.Grants.is_grant(token.strip()):
            raise ASRError(ErrorCode.UNAUTHENTICATED, "malformed credentials: a token request needs "
                           "'Authorization: Token <key>' or 'Bearer <key>' with an API key")
        return self._api_key_client(token.strip())

    def _status(self) -> dict:
        """``GET /api/status``: what the page needs (the Deepgram path, whether it needs a key)."""
        out = {"websocket": "/v1/listen", "grant": "/v1/auth/grant", "auth": self._digests is not None}
        if self.service is None:
            return {"reachable": False, "code": "UNAVAILABLE", "error": "the server is starting", **out}
        return {"reachable": True, "model": self.service.description.model_name,
                "precision": self.settings.precision, "device": self.settings.device, **out}

    async def _free_if_unused(self, connection: ServerConnection, accepted: _Accepted) -> None:
        await connection.wait_closed()
        if not accepted.taken and self.service is not None:
            self.service.close_session(accepted.session, ASRError(ErrorCode.CANCELLED, "handshake failed"))

    async def _handle(self, connection: ServerConnection) -> None:
        refused = getattr(connection, "asr_refused", None)
        if refused is not None:
            protocol, error = refused
            await connection.send(json.dumps(protocol.error_event(error), separators=(",", ":")))
            await connection.close(close_code(error.code), close_reason(error.message))
            return
        accepted: _Accepted = connection.asr_accepted
        accepted.taken = True
        stream = WsStream(connection, self.service, accepted.protocol.API, accepted.client, accepted.session,
                          browser=accepted.browser)
        try:
            await accepted.protocol.serve(stream, accepted.options)
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("%s connection failed", accepted.protocol.API)
            self.observer.error_returned(ErrorCode.INTERNAL)
            await connection.close(1011, "internal error")
        finally:
            stream.close_all()


# --- one connection ----------------------------------------------------------------------------
@dataclass
class Segment:
    """One session of a connection: the audio up to a commit / Finalize (or the end)."""

    session: Session
    offset_s: float  # audio of the connection before this segment
    intake: AudioIntake | None = None
    frames: int = 0  # sample frames fed
    cleared: bool = False  # discarded by the client: its results are dropped
    state: dict = field(default_factory=dict)  # the adapter's own bookkeeping

    @property
    def started(self) -> bool:
        return self.session.config is not None

    @property
    def seconds(self) -> float:
        return self.frames / self.session.config.sample_rate_hertz if self.started else 0.0


class Idle(Exception):
    """No message within the idle deadline and no stream to end gracefully."""


class WsStream:
    """A connection's sessions and its socket: reading with the idle timeout and the message size
    limit, sending JSON, and the segments in order (``results`` yields theirs one after another)."""

    def __init__(self, connection: ServerConnection, service: RecognitionService, api: str, client: str,
                 first: Session, browser: bool = False):
        self.connection = connection
        self.service = service
        self.settings = service.settings
        self.observer = service.observer
        self.api = api
        self.client = client
        self.segments: list[Segment] = [Segment(first, 0.0)]  # the last one takes the audio
        self._all: list[Segment] = list(self.segments)
        self._queue: asyncio.Queue[Segment | None] = asyncio.Queue()
        self._queue.put_nowait(self.segments[0])
        self.input_ended = False
        self.client_gone = False
        self._last_message_at = time.monotonic()
        self._send_lock = asyncio.Lock()
        # a browser page's messages: --ws-browser-max-message-bytes, and a token bucket of
        # --ws-browser-max-messages-per-second (one second's worth of burst)
        self.browser = browser
        self._rate = self.settings.ws_browser_max_messages_per_second
        self._allowance = float(self._rate)

    # --- segments ----------------------------------------------------------------------------
    @property
    def current(self) -> Segment | None:
        """The segment taking audio now, if any (None after a commit until more audio comes)."""
        return self.segments[-1] if self.segments else None

    def open_segment(self) -> Segment:
        """A new segment after a commit / Finalize (admitted like a new stream: may raise ASRError)."""
        offset = sum(s.seconds for s in self._all if not s.cleared)
        segment = Segment(self.service.open_session(self.api, self.client), offset)
        self.segments = [segment]
        self._all.append(segment)
        self._queue.put_nowait(segment)
        return segment

    def end_segment(self) -> Segment | None:
        """The current segment's input is complete; later audio opens a new one."""
        segment = self.current
        if segment is None:
            return None
        self.segments = []
        if segment.started:
            segment.session.finish_input()
        else:  # no audio: nothing to recognise
            segment.cleared = True
            segment.session.fail(ASRError(ErrorCode.CANCELLED, "ended without audio"))
        return segment

    def end_input(self) -> None:
        """No more audio on this connection: ``results`` ends after the last segment's."""
        self.end_segment()
        if not self.input_ended:
            self.input_ended = True
            self._queue.put_nowait(None)

    async def feed(self, segment: Segment, data: bytes) -> None:
        """Audio for ``segment`` (started), with backpressure: waits while it is too far ahead."""
        before = segment.intake._partial
        segment.intake.feed(data)
        segment.frames += (len(before) + len(data) - len(segment.intake._partial)) // segment.session.config.frame_bytes
        session = segment.session
        if not session.has_room:
            await session.wait_for_room()
            session.pace.refill(time.monotonic())  # a client held back by us is not idle

    async def results(self):
        """(segment, result) of every segment in order, then (segment, None); ASRError of a segment ends it (a cleared
        segment's are dropped). Each segment's session is closed when its results end."""
        while True:
            segment = await self._queue.get()
            if segment is None:
                return
            session = segment.session
            try:
                async for result in session.results():
                    if not segment.cleared:
                        yield segment, result
                if not segment.cleared:
                    yield segment, None  # the segment's results are complete
            except ASRError:
                if not segment.cleared:
                    raise
            finally:
                self.service.close_session(session, ASRError(ErrorCode.CANCELLED, "cleared")
                                           if segment.cleared else None)

    def close_all(self) -> None:
        for segment in self._all:
            self.service.close_session(segment.session)

    # --- socket ------------------------------------------------------------------------------
    async def receive(self) -> str | bytes | None:
        """The next message; None once the client closed the connection. On the idle deadline
        (``--idle-timeout-seconds`` / ``--min-audio-rate``, as for gRPC streams) the current
        session is ended gracefully (final result, then OUT_OF_RANGE) and None is returned;
        without a session taking audio, ``Idle`` is raised."""
        segment = self.current
        if segment is not None and segment.started and segment.session.accepting_audio:
            deadline = segment.session.pace.idle_deadline
        else:
            deadline = self._last_message_at + self.settings.idle_timeout_seconds
        try:
            message = await asyncio.wait_for(self.connection.recv(), max(0.0, deadline - time.monotonic()))
        except ConnectionClosed as exc:
            self.client_gone = True
            if exc.sent is not None and exc.sent.code == 1009:  # over max_size: refused unread, counted
                self.observer.limit_hit(LimitReason.MAX_MESSAGE_BYTES)
            return None
        except TimeoutError:
            self.observer.limit_hit(LimitReason.IDLE_TIMEOUT)
            error = ASRError(ErrorCode.OUT_OF_RANGE, f"no audio for {self.settings.idle_timeout_seconds:g} s "
                             f"(--idle-timeout-seconds): the stream was ended after the final result of "
                             f"the audio received")
            if segment is not None and segment.started and segment.session.end_input(error):
                return None
            raise Idle(error.message) from None
        now = time.monotonic()
        elapsed, self._last_message_at = now - self._last_message_at, now
        size = len(message)
        if self.browser:
            self._check_browser_message(size, elapsed)
        limit = self.settings.max_message_bytes * (4 / 3 if isinstance(message, str) else 1) + 4096
        if size > limit:
            self.observer.limit_hit(LimitReason.MAX_MESSAGE_BYTES)
            raise ASRError(ErrorCode.RESOURCE_EXHAUSTED, f"a message of {size} bytes is larger than the limit "
                           f"(--max-message-bytes {self.settings.max_message_bytes} of audio); send audio in "
                           f"smaller pieces")
        return message

    def _check_browser_message(self, size: int, elapsed: float) -> None:
        s = self.settings
        limit = s.ws_browser_max_message_bytes
        if size > limit:
            self.observer.limit_hit(LimitReason.MAX_MESSAGE_BYTES)
            raise ASRError(ErrorCode.RESOURCE_EXHAUSTED, f"a message of {size} bytes is larger than a browser "
                           f"page's limit (--ws-browser-max-message-bytes {limit}); "
                           f"send audio in smaller pieces")
        self._allowance = min(float(self._rate), self._allowance + elapsed * self._rate)
        if self._allowance < 1.0:
            self.observer.limit_hit(LimitReason.MESSAGE_RATE)
            raise ASRError(ErrorCode.RESOURCE_EXHAUSTED, f"more than {self._rate} messages a second "
                           f"(--ws-browser-max-messages-per-second): send audio in larger pieces")
        self._allowance -= 1.0

    async def send_json(self, event: dict) -> None:
        async with self._send_lock:
            await self.connection.send(json.dumps(event, separators=(",", ":")))

    async def close(self, code: int = NORMAL_CLOSE, reason: str = "") -> None:
        await self.connection.close(code, reason[:120])


def b64decode(text: Any, param: str) -> bytes:
    if not isinstance(text, str):
        raise ASRError(ErrorCode.INVALID_ARGUMENT, f"{param} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise ASRError(ErrorCode.INVALID_ARGUMENT, f"{param} is not valid base64") from None
