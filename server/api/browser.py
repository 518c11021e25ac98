"""Browsers on the WebSocket port: short-lived connection tokens, the Origin allow-list, the page.

A browser cannot set headers on a WebSocket, so it cannot send ``Authorization``. It authenticates
the vendors' way instead: an application's backend (or the page, with a key its user typed) mints
a short-lived token with its API key, and the browser passes that token in the
``Sec-WebSocket-Protocol`` header:

- Deepgram: ``POST /v1/auth/grant`` (``Authorization: Token <key>`` or ``Bearer <key>``, body
  ``{"ttl_seconds": N}`` optional) -> ``{"access_token": ..., "expires_in": N}``; the browser
  opens ``new WebSocket(url, ["bearer", access_token])`` (or ``["token", <key>]`` with the key).
- OpenAI: ``POST /v1/realtime/transcription_sessions`` (``Authorization: Bearer <key>``) ->
  ``{"client_secret": {"value": ..., "expires_at": <unix s>}, ...}``; the browser opens
  ``new WebSocket(url, ["realtime", "openai-insecure-api-key." + value])``.

A token opens one connection (``Grants.redeem`` refuses it a second time), of the protocol it
was minted for, within ``--ws-token-ttl-seconds`` (60 s by default) of minting; the connection
then lasts as long as its stream. Tokens are HMAC-signed (key: a digest of every
``--auth-token-file`` token, so every replica sharing the file accepts them; their single use is
kept per replica), and are never logged. Non-browser clients may present a token in
``Authorization: Bearer`` too (the SDKs' ``access_token`` / ephemeral key).

A request with an ``Origin`` header comes from a browser page: it is served only when the origin
is listed in ``--ws-allow-origin`` or is this server's own (the page at ``GET /``, opened by IP
address, ``localhost`` or a listed host name: a DNS-rebinding page's host name is neither). Its
messages have their own limits (``--ws-browser-max-message-bytes``,
``--ws-browser-max-messages-per-second``). Refusals reach a browser as the protocol's error
message and a close frame with the reason (a browser never sees an HTTP status of a WebSocket
handshake); other clients get the HTTP status.

The page (``client/web/``) is served at ``GET /`` with ``/static/*`` and ``/api/status`` (the
page reads from it which protocol path to use and whether it needs a key).
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import heapq
import hmac
import http
import ipaddress
import json
import secrets
import time
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import InvalidMessage
from websockets.http11 import Request, Response, parse_headers, parse_line
from websockets.protocol import Protocol

from server.errors import ASRError, ErrorCode

STATIC = Path(__file__).resolve().parents[2] / "client" / "web"
PAGES = {"/": ("index.html", "text/html; charset=utf-8"),
         "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
         "/static/pcm-worklet.js": ("pcm-worklet.js", "text/javascript; charset=utf-8")}
GRANT_PREFIX = "asrg1."
MAX_BODY_BYTES = 16 * 1024  # a token request's JSON body
MAX_OUTSTANDING = 100_000  # used tokens remembered until they expire
OPENAI_KEY_PREFIX = "openai-insecure-api-key."


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def unauthenticated(message: str) -> ASRError:
    return ASRError(ErrorCode.UNAUTHENTICATED, message)


class Grants:
    """Short-lived single-use connection tokens: ``asrg1.<payload>.<HMAC-SHA256>``, the payload
    naming the protocol (``purpose``), the client the minting key is (its streams count against
    that key's ``--max-streams-per-client`` quota), the expiry and a random nonce."""

    def __init__(self, tokens: Iterable[str] | None, ttl_s: float):
        self.ttl_s = ttl_s
        secret = b"\0".join(sorted(t.encode("utf-8", "surrogateescape") for t in tokens)) if tokens else b""
        # without tokens (no --auth-token-file) connections need none: a random key suffices
        self._key = hashlib.sha256(b"asr websocket grant v1\0" + secret).digest() if secret else secrets.token_bytes(32)
        self._used: dict[str, float] = {}  # nonce -> expiry
        self._expiries: list[tuple[float, str]] = []

    def mint(self, purpose: str, client: str, ttl_s: float | None = None) -> tuple[str, float]:
        """A new token and its expiry (unix seconds)."""
        expires = time.time() + (ttl_s if ttl_s is not None else self.ttl_s)
        payload = _b64(json.dumps({"p": purpose, "c": client, "e": round(expires, 3), "n": secrets.token_hex(12)},
                                  separators=(",", ":")).encode())
        return f"{GRANT_PREFIX}{payload}.{self._mac(payload)}", expires

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode("utf-8", "surrogateescape"), hashlib.sha256).digest())

    @staticmethod
    def is_grant(token: str) -> bool:
        return token.startswith(GRANT_PREFIX)

    def redeem(self, token: str, purpose: str) -> str:
        """The client a valid, unused, unexpired token of ``purpose`` was minted for (the token is
        used up); ASRError UNAUTHENTICATED saying what is wrong with it otherwise."""
        payload, _, mac = token[len(GRANT_PREFIX):].partition(".")
        if not payload or not mac or not hmac.compare_digest(mac.encode("utf-8", "surrogateescape"),
                                                             self._mac(payload).encode()):
            raise unauthenticated("invalid token: not one this server minted (or minted with other API keys)")
        claims = json.loads(_unb64(payload))
        now = time.time()
        if claims["p"] != purpose:
            raise unauthenticated(f"the token was minted for {claims['p']}, not for this path: mint one for it")
        if claims["e"] <= now:
            raise unauthenticated(f"the token expired {now - claims['e']:.0f} s ago (tokens open a connection "
                                  f"within --ws-token-ttl-seconds of minting): mint a new one")
        self._forget_expired(now)
        if claims["n"] in self._used:
            raise unauthenticated("the token was already used: a token opens one connection, mint a new one")
        if len(self._used) >= MAX_OUTSTANDING:
            raise ASRError(ErrorCode.UNAVAILABLE, "too many tokens in use; retry shortly")
        self._used[claims["n"]] = claims["e"]
        heapq.heappush(self._expiries, (claims["e"], claims["n"]))
        return claims["c"]

    def _forget_expired(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            _, nonce = heapq.heappop(self._expiries)
            self._used.pop(nonce, None)


# --- credentials of a handshake ----------------------------------------------------------------
def subprotocols(headers: Headers) -> list[str]:
    return [p.strip() for value in headers.get_all("Sec-WebSocket-Protocol") for p in value.split(",") if p.strip()]


def subprotocol_credential(offered: list[str]) -> tuple[str, str] | None:
    """(scheme, credential) a browser put in ``Sec-WebSocket-Protocol``: Deepgram's ``token, <key>``
    and ``bearer, <token>``, OpenAI's ``openai-insecure-api-key.<key or client secret>``."""
    for i, name in enumerate(offered[:-1]):
        if name.lower() in ("token", "bearer"):
            return name.lower(), offered[i + 1]
    for name in offered:
        if name.startswith(OPENAI_KEY_PREFIX) and len(name) > len(OPENAI_KEY_PREFIX):
            return "bearer", name[len(OPENAI_KEY_PREFIX):]
    return None


def select_subprotocol(offered: list[str]) -> str | None:
    """The subprotocol the server answers (a browser fails a connection whose offer goes
    unanswered): OpenAI's ``realtime``, Deepgram's ``token`` / ``bearer``."""
    for name in ("realtime", "token", "bearer"):
        for p in offered:
            if p.lower() == name:
                return p
    return None


# --- origins -----------------------------------------------------------------------------------
def normalize_origin(origin: str) -> str:
    """``scheme://host[:port]`` as browsers send it in ``Origin`` (lower case, no default port);
    ValueError for anything else."""
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username:
        raise ValueError(f"not an http(s) origin such as https://app.example:8443: {origin!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    port = parts.port
    return f"{parts.scheme}://{host}" + ("" if port in (None, {"http": 80, "https": 443}[parts.scheme]) else f":{port}")


class OriginPolicy:
    """Which browser origins may use the port: the ``--ws-allow-origin`` list, and the server's own
    (``Origin`` equal to ``<scheme>://<Host>``) where ``Host`` is an IP address, ``localhost`` or
    the host of a listed origin. A request without ``Origin`` is not from a browser page."""

    def __init__(self, allowed: Iterable[str], tls: bool):
        self.allowed = {normalize_origin(o) for o in allowed}
        self.hosts = {"localhost"} | {urlsplit(o).hostname for o in self.allowed}
        self.scheme = "https" if tls else "http"

    def _own(self, origin: str, host: str | None) -> bool:
        if not host:
            return False
        try:
            if normalize_origin(f"{self.scheme}://{host}") != origin:
                return False
            name = urlsplit(f"//{host}").hostname or ""
        except ValueError:
            return False
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return name in self.hosts

    def refusal(self, headers: Headers) -> str | None:
        origin = headers.get("Origin")
        if origin is None:
            return None
        try:
            normalized = normalize_origin(origin)
        except ValueError:
            normalized = None
        if normalized is not None and (normalized in self.allowed or self._own(normalized, headers.get("Host"))):
            return None
        shown = origin if len(origin) <= 80 else origin[:79] + "…"
        return (f"origin {shown!r} may not use this server's WebSocket API (asr-server --ws-allow-origin "
                f"ORIGIN allows one)")


# --- plain HTTP on the WebSocket port ------------------------------------------------------------
def http_response(status: int, body: bytes | str | dict, content_type: str | None = None,
                  headers: dict | None = None) -> Response:
    if isinstance(body, dict):
        body, content_type = json.dumps(body) + "\n", "application/json"
    if isinstance(body, str):
        body, content_type = body.encode(), content_type or "text/plain; charset=utf-8"
    h = Headers([("Date", email.utils.formatdate(usegmt=True)), ("Connection", "close"),
                 ("Content-Length", str(len(body))), ("Content-Type", content_type or "application/octet-stream"),
                 ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")])
    for key, value in (headers or {}).items():
        h[key] = value
    return Response(status, http.HTTPStatus(status).phrase, h, body)


def static_page(path: str) -> Response | None:
    entry = PAGES.get(path)
    if entry is None:
        return None
    name, content_type = entry
    return http_response(200, (STATIC / name).read_bytes(), content_type)


def request_method(request: Request) -> str:
    return getattr(request, "method", "GET")


def request_json(request: Request) -> dict:
    """The JSON object of a token request's body ({} when empty); ASRError INVALID_ARGUMENT otherwise."""
    body = getattr(request, "body", b"")
    if body is None:
        raise ASRError(ErrorCode.INVALID_ARGUMENT, f"the request body is over {MAX_BODY_BYTES} bytes")
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except ValueError:
        raise ASRError(ErrorCode.INVALID_ARGUMENT, "the request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise ASRError(ErrorCode.INVALID_ARGUMENT, "the request body must be a JSON object")
    return value


def _read_request(reader) -> Any:
    """``websockets.http11.Request.parse``, also taking POST and OPTIONS requests with a small body
    (the token grants): the request gets ``method`` and ``body`` (None when over MAX_BODY_BYTES)."""
    line = yield from parse_line(reader.read_line)
    try:
        method, raw_path, version = line.split(b" ", 2)
    except ValueError:
        raise ValueError(f"invalid HTTP request line: {line[:100]!r}") from None
    if version != b"HTTP/1.1":
        raise ValueError(f"unsupported protocol; expected HTTP/1.1: {line[:100]!r}")
    if method not in (b"GET", b"POST", b"OPTIONS"):
        raise ValueError(f"unsupported HTTP method: {method[:20]!r}")
    headers = yield from parse_headers(reader.read_line)
    if "Transfer-Encoding" in headers:
        raise NotImplementedError("transfer codings aren't supported")
    body: bytes | None = b""
    if "Content-Length" in headers:
        if method == b"GET":
            raise ValueError("unsupported request body")
        length = int(headers["Content-Length"])
        if length < 0:
            raise ValueError("invalid Content-Length")
        body = (yield from reader.read_exact(length)) if length <= MAX_BODY_BYTES else None
    request = Request(raw_path.decode("ascii", "surrogateescape"), headers)
    request.method = method.decode()
    request.body = body
    return request


def _parse(protocol) -> Any:
    """``ServerProtocol.parse`` with ``_read_request`` for the opening request."""
    try:
        request = yield from _read_request(protocol.reader)
    except Exception as exc:
        protocol.handshake_exc = InvalidMessage("did not receive a valid HTTP request")
        protocol.handshake_exc.__cause__ = exc
        protocol.send_eof()
        protocol.parser = protocol.discard()
        next(protocol.parser)
        yield
    protocol.events.append(request)
    yield from Protocol.parse(protocol)


class HttpServerConnection(ServerConnection):
    """A connection of the WebSocket port whose first request may also be a token request (POST)
    or a CORS preflight (OPTIONS); ``process_request`` answers those with an HTTP response."""

    def __init__(self, protocol, *args, **kwargs):
        protocol.parser = _parse(protocol)  # no byte has arrived yet
        next(protocol.parser)
        super().__init__(protocol, *args, **kwargs)
