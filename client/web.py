"""``asr-web``: a browser page that streams the microphone to an asr.v1 server.

Serves a small static page (``client/web/``), a WebSocket bridge at ``/ws`` and the
backend's status at ``/api/status``. The bridge is a thin client of the gRPC API, like
``asr-client``: one ``StreamingRecognize`` call per WebSocket, the browser's audio
forwarded as it comes, every result sent back as JSON with the server's timing. Nothing
is recognised here. Browsers give pages the microphone only on ``localhost`` or over
HTTPS: to serve other machines, pass ``--tls-cert`` and ``--tls-key``.

Only the bridge's own page (and the origins given to ``--allow-origin``) may use ``/ws``
and ``/api/``: other browser origins get HTTP 403 (docs/operations.md, "The browser bridge").

WebSocket protocol, one recognition stream per connection:

* browser -> bridge: a JSON text message first (``{"sample_rate": 16000}``,
  optionally ``"beam": N``, ``"endpointing": false``, ``"request_id": "..."``, ``"phrases": [...]``
  and ``"boost": X`` (contextual biasing: one ``SpeechContext``; the server checks its limits);
  nothing else),
  then binary LINEAR16 mono messages (up to 64 KiB each), then the text message ``end``
  (half-close: the last final result follows);
* bridge -> browser: ``{"type": "ready", "model": ...}``, one ``{"type": "result", ...}``
  per result, then ``{"type": "end"}`` or ``{"type": "error", "code": ..., "message": ...}``
  (one line), after which the bridge closes the WebSocket.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import itertools
import json
import logging
import math
import os
import ssl
import sys
import time
from pathlib import Path
from typing import Iterable
from urllib.parse import urlsplit

import grpc
import numpy as np
import soundfile
from aiohttp import WSCloseCode, WSMsgType, web

from asr.v1 import asr_pb2, asr_pb2_grpc
from client.connection import Connection, add_connection_args, parse_args
from client.phrases import PhraseError, clean
from client.stream import StreamOptions, channel, stream_chunks

LOG = logging.getLogger("asr-web")
STATIC = Path(__file__).resolve().parent / "web"
MAX_MESSAGE_BYTES = 64 * 1024  # a page sends 5 KiB messages (160 ms at 16 kHz)
HARD_MESSAGE_BYTES = 4 * MAX_MESSAGE_BYTES  # beyond it aiohttp closes with 1009 without reading it all
MAX_CONFIG_CHARS = 32 * 1024  # room for a list of phrases
CONFIG_TIMEOUT_S = 10
CONFIG_KEYS = ("sample_rate", "beam", "endpointing", "request_id", "phrases", "boost")
FIRST_MESSAGE = 'the first message must be a JSON config such as {"sample_rate": 16000}'
STUB = web.AppKey("stub", asr_pb2_grpc.SpeechRecognitionStub)  # the streams
INFO = web.AppKey("info", asr_pb2_grpc.SpeechRecognitionStub)  # GetModelInfo, on a channel of its own
SAVER = web.AppKey("saver", object)
GUARD = web.AppKey("guard", object)
_session_ids = itertools.count(1)


class BridgeError(Exception):
    """What the page did wrong, as a gRPC-style code and a one-line message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def one_line(text: object, limit: int = 200) -> str:
    """``text`` on one line (whitespace runs collapsed), cut to ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 1] + "…"


def _seconds(duration) -> float:
    return round(duration.seconds + duration.nanos / 1e9, 3)


def result_message(result: asr_pb2.StreamingRecognitionResult, bridge_latency_s: float | None) -> dict:
    """One result as the page sees it: text, finality, times, and where the time went."""
    alt = result.alternatives[0] if result.alternatives else None
    t = result.timing
    return {"type": "result", "transcript": alt.transcript if alt else "", "is_final": result.is_final,
            "stability": round(result.stability, 3), "confidence": round(alt.confidence, 3) if alt else 0.0,
            "utterance": result.utterance_index, "start_s": _seconds(result.result_start_time),
            "end_s": _seconds(result.result_end_time),
            "latency_ms": round(t.chunk_latency_ms, 1), "queue_wait_ms": round(t.queue_wait_ms, 1),
            "compute_ms": round(t.compute_ms, 1), "batch_size": t.batch_size,
            "bridge_latency_ms": None if bridge_latency_s is None else round(bridge_latency_s * 1000, 1)}


def _integer(config: dict, key: str, low: int, high: int, default: int | None = None) -> int:
    value = config.get(key, default)
    if value is None:
        raise BridgeError("INVALID_ARGUMENT", f"the config needs {key!r}, such as {{\"sample_rate\": 16000}}")
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BridgeError("INVALID_ARGUMENT", f"{key!r} must be a whole number from {low} to {high}, "
                          f"not {one_line(json.dumps(value), 40)}")
    return value


def parse_config(text: object) -> tuple[int, StreamOptions]:
    """The page's first message -> (sample rate, stream options). Raises ``BridgeError``
    (``INVALID_ARGUMENT``, one line naming the key) for anything but a JSON object of
    ``CONFIG_KEYS`` with values of the right type and range."""
    if not isinstance(text, str) or len(text) > MAX_CONFIG_CHARS:
        raise BridgeError("INVALID_ARGUMENT", FIRST_MESSAGE)
    try:
        config = json.loads(text)
    except ValueError:
        raise BridgeError("INVALID_ARGUMENT", FIRST_MESSAGE) from None
    if not isinstance(config, dict):
        raise BridgeError("INVALID_ARGUMENT", FIRST_MESSAGE)
    unknown = [key for key in config if key not in CONFIG_KEYS]
    if unknown:
        raise BridgeError("INVALID_ARGUMENT", one_line(f"unknown config key {unknown[0]!r} "
                                                       f"(known: {', '.join(CONFIG_KEYS)})"))
    rate = _integer(config, "sample_rate", 8000, 48000)
    beam = _integer(config, "beam", 0, 64, default=0)
    endpointing = config.get("endpointing", True)
    if not isinstance(endpointing, bool):
        raise BridgeError("INVALID_ARGUMENT", "'endpointing' must be true or false")
    request_id = config.get("request_id", "")
    if not isinstance(request_id, str) or len(request_id) > 128:
        raise BridgeError("INVALID_ARGUMENT", "'request_id' must be a string of up to 128 characters")
    phrases = config.get("phrases", [])
    if not isinstance(phrases, list) or not all(isinstance(p, str) for p in phrases):
        raise BridgeError("INVALID_ARGUMENT", "'phrases' must be a list of strings")
    try:
        phrases = [clean(p, "'phrases'") for p in phrases]
    except PhraseError as exc:
        raise BridgeError("INVALID_ARGUMENT", one_line(exc)) from None
    boost = config.get("boost", 0)
    if isinstance(boost, bool) or not isinstance(boost, (int, float)) or not math.isfinite(boost):
        raise BridgeError("INVALID_ARGUMENT", "'boost' must be a number")
    if boost and not phrases:
        raise BridgeError("INVALID_ARGUMENT", "'boost' needs 'phrases'")
    return rate, StreamOptions(interim_results=True, endpointing=endpointing, beam_width=beam,
                               decoding_method=asr_pb2.BEAM_SEARCH if beam else asr_pb2.DECODING_METHOD_UNSPECIFIED,
                               request_id=request_id, phrases=tuple(phrases), boost=float(boost))


class AudioSaver:
    """``--save-audio``: each session's audio goes to its own WAV in ``folder`` as it arrives
    (nothing is kept in memory), at most ``max_seconds`` per session; no session saves more once
    the folder's files add up to ``max_bytes``. Either bound logs one line when it is hit."""

    def __init__(self, folder: Path, max_seconds: float = 600, max_bytes: int = 1000 * 10**6):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.max_seconds, self.max_bytes = folder, max_seconds, max_bytes
        self.used = 0  # bytes in the folder: scanned when a session starts, plus what sessions wrote since

    def _scan(self) -> int:
        return sum(entry.stat().st_size for entry in os.scandir(self.folder) if entry.is_file())

    def _full(self) -> bool:
        if self.used < self.max_bytes:
            return False
        LOG.warning("--save-audio: %s holds %.1f MB, --save-audio-max-mb is %.1f: not saving audio",
                    self.folder, self.used / 1e6, self.max_bytes / 1e6)
        return True

    def session(self, rate: int) -> "SavedSession | None":
        """A writer for a new session at ``rate`` Hz; ``None`` when the folder is full."""
        try:
            self.used = self._scan()
            if self._full():
                return None
            return SavedSession(self, self.folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{next(_session_ids)}.wav", rate)
        except (OSError, RuntimeError) as exc:  # soundfile raises a RuntimeError
            LOG.warning("--save-audio: cannot write to %s: %s", self.folder, one_line(exc))
            return None


class SavedSession:
    """One session's WAV, written chunk by chunk; ``close()`` finishes it (or removes it when empty)."""

    def __init__(self, saver: AudioSaver, path: Path, rate: int):
        self.saver, self.path = saver, path
        self.frames_left = int(saver.max_seconds * rate)
        self.frames = 0
        self.file: soundfile.SoundFile | None = soundfile.SoundFile(str(path), "w", rate, 1, "PCM_16", format="WAV")

    def write(self, pcm: bytes) -> None:
        if self.file is None:
            return
        room = max(0, self.saver.max_bytes - self.saver.used) // 2
        samples = np.frombuffer(pcm, "<i2", count=len(pcm) // 2)[:min(self.frames_left, room)]
        if len(samples):
            try:
                self.file.write(samples)
                self.file.flush()
            except (OSError, RuntimeError) as exc:
                LOG.warning("--save-audio: cannot write %s: %s", self.path, one_line(exc))
                return self.close()
            self.frames += len(samples)
            self.frames_left -= len(samples)
            self.saver.used += samples.nbytes
        if self.frames_left <= 0:
            LOG.warning("--save-audio: %s reached --save-audio-max-seconds (%g s): the rest of the session "
                        "is not saved", self.path.name, self.saver.max_seconds)
            self.close()
        elif self.saver._full():
            self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
            if not self.frames:
                self.path.unlink(missing_ok=True)


def normalize_origin(origin: str) -> str:
    """``scheme://host[:port]`` as browsers send it in ``Origin`` (lower case, no default port);
    raises ``ValueError`` for anything else (a path, ``null``, another scheme)."""
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username:
        raise ValueError(f"not an http(s) origin such as https://asr.example:8443: {origin!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    port = parts.port  # raises ValueError for a bad port
    return f"{parts.scheme}://{host}" + ("" if port in (None, {"http": 80, "https": 443}[parts.scheme]) else f":{port}")


class OriginGuard:
    """Which requests may use ``/ws`` and ``/api/``. A browser's request must name, in ``Host``, an
    IP address, ``localhost``, the address the bridge serves on or the host of an allowed origin
    (this defeats DNS rebinding), and, in ``Origin``, the bridge's own origin or an allowed one.
    A request without ``Origin`` is not from a browser page and passes the ``Origin`` check."""

    def __init__(self, allowed: Iterable[str] = (), bind_host: str | None = None):
        self.allowed = {normalize_origin(origin) for origin in allowed}
        self.hosts = {"localhost", (bind_host or "localhost").lower()} | {urlsplit(o).hostname for o in self.allowed}

    def _trusted_host(self, host: str | None) -> bool:
        if not host:
            return False
        try:
            ipaddress.ip_address(host)
            return True
        except ValueError:
            return host in self.hosts

    def refusal(self, request: web.BaseRequest) -> str | None:
        """``None`` when ``request`` may go on, else the one-line reason it may not."""
        try:
            host = urlsplit(f"//{request.host}").hostname
        except ValueError:
            host = None
        if not self._trusted_host(host):
            return (f"Host {one_line(request.host, 80)!r} is not this bridge's: open the page by IP address, "
                    "localhost, or a name whose origin is given to --allow-origin")
        origin = request.headers.get("Origin")
        if origin is None:
            return None
        try:
            if normalize_origin(origin) in self.allowed | {normalize_origin(f"{request.scheme}://{request.host}")}:
                return None
        except ValueError:
            pass
        return f"origin {one_line(origin, 80)!r} may not use this bridge (asr-web --allow-origin ORIGIN allows one)"


@web.middleware
async def _origin_check(request: web.Request, handler):
    if request.path == "/ws" or request.path.startswith("/api/"):
        reason = request.app[GUARD].refusal(request)
        if reason:
            LOG.warning("refused %s from %s: %s", request.path, request.remote, reason)
            raise web.HTTPForbidden(text=f"asr-web: {reason}\n")
        if request.path.startswith("/api/") and "Origin" in request.headers:  # an allowed origin may read it
            response = await handler(request)
            response.headers.update({"Access-Control-Allow-Origin": request.headers["Origin"], "Vary": "Origin"})
            return response
    return await handler(request)


async def backend_status(stub: asr_pb2_grpc.SpeechRecognitionStub, timeout_s: float = 3.0) -> dict:
    """Whether the gRPC server answers ``GetModelInfo``: ``{"reachable": true, "model": ...,
    "precision": ..., "device": ...}``, or ``{"reachable": false, "code": ..., "error": <one line>}``."""
    try:
        info = await stub.GetModelInfo(asr_pb2.GetModelInfoRequest(), timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        return {"reachable": False, "code": exc.code().name, "error": one_line(f"{exc.code().name}: {exc.details()}")}
    return {"reachable": True, "model": info.model_name, "precision": info.precision, "device": info.device}


async def _send_error(ws: web.WebSocketResponse, code: str, message: str) -> None:
    if not ws.closed:
        await ws.send_json({"type": "error", "code": code, "message": one_line(message)})


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=HARD_MESSAGE_BYTES)
    await ws.prepare(request)
    try:
        try:
            first = await ws.receive(timeout=CONFIG_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise BridgeError("INVALID_ARGUMENT", f"no config within {CONFIG_TIMEOUT_S:g} s") from None
        rate, options = parse_config(first.data if first.type == WSMsgType.TEXT else None)
    except BridgeError as exc:
        await _send_error(ws, exc.code, str(exc))
        await ws.close()
        return ws
    saver = request.app[SAVER]
    saved = saver.session(rate) if saver else None
    problem: BridgeError | None = None

    async def chunks():
        nonlocal problem
        async for msg in ws:
            if msg.type == WSMsgType.BINARY and len(msg.data) <= MAX_MESSAGE_BYTES:
                if saved:
                    saved.write(msg.data)
                yield msg.data
            elif msg.type == WSMsgType.TEXT and msg.data == "end":
                return
            elif msg.type in (WSMsgType.BINARY, WSMsgType.TEXT):
                problem = (BridgeError("RESOURCE_EXHAUSTED", f"a message of {len(msg.data)} bytes is over the "
                                       f"bridge's limit of {MAX_MESSAGE_BYTES}")
                           if msg.type == WSMsgType.BINARY else
                           BridgeError("INVALID_ARGUMENT", "after the config, only binary audio and 'end' may come"))
                return  # half-close: the server ends the stream at once

    try:
        info = await request.app[INFO].GetModelInfo(asr_pb2.GetModelInfoRequest(), timeout=10)
        await ws.send_json({"type": "ready", "model": info.model_name})
        async for event in stream_chunks(request.app[STUB], chunks(), rate, options):
            if ws.closed or problem:  # the browser went away or misbehaved: leaving stream_chunks cancels the call
                break
            for result in event.response.results:
                await ws.send_json(result_message(result, event.client_latency_s))
        if problem:
            await _send_error(ws, problem.code, str(problem))
        elif not ws.closed:
            await ws.send_json({"type": "end"})
    except grpc.aio.AioRpcError as exc:
        await _send_error(ws, exc.code().name, exc.details() or exc.code().name)
    except ConnectionResetError:  # the browser went away while we were sending
        pass
    except Exception as exc:  # a bug here: the page gets one line, the log the traceback
        LOG.exception("session failed")
        await _send_error(ws, "INTERNAL", f"the bridge failed: {type(exc).__name__}")
    finally:
        await ws.close(code=WSCloseCode.MESSAGE_TOO_BIG if problem and problem.code == "RESOURCE_EXHAUSTED"
                       else WSCloseCode.OK)
        if saved:
            saved.close()
    return ws


def create_app(server: str | Connection, save_audio: Path | None = None, allow_origins: Iterable[str] = (),
               bind_host: str | None = None, save_audio_max_seconds: float = 600,
               save_audio_max_mb: float = 1000) -> web.Application:
    """The page and the bridge to the gRPC server ``server`` (HOST:PORT, or a ``Connection``).

    ``allow_origins``: browser origins besides the bridge's own that may use it (``OriginGuard``;
    ``bind_host``: the address it serves on); ``save_audio``: a folder for ``AudioSaver``."""
    app = web.Application(middlewares=[_origin_check])
    app[GUARD] = OriginGuard(allow_origins, bind_host)
    app[SAVER] = AudioSaver(save_audio, save_audio_max_seconds, int(save_audio_max_mb * 10**6)) if save_audio else None

    async def grpc_channel(app: web.Application):
        # The streams on one channel, the model queries on another: a round-robin channel
        # (a target naming several servers) takes the next server for each call, and one
        # GetModelInfo before each stream would put every stream on the same server.
        async with channel(server) as streams, channel(server) as queries:
            app[STUB] = asr_pb2_grpc.SpeechRecognitionStub(streams)
            app[INFO] = asr_pb2_grpc.SpeechRecognitionStub(queries)
            yield

    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    async def status(request: web.Request) -> web.Response:
        return web.json_response(await backend_status(request.app[INFO]))

    app.cleanup_ctx.append(grpc_channel)
    app.router.add_get("/", index)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/api/status", status)
    app.router.add_static("/static", STATIC)
    return app


async def start(app: web.Application, host: str = "127.0.0.1", port: int = 0,
                ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    """Serve ``app``; returns the runner (``await runner.cleanup()`` stops it) and the bound port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    return runner, runner.addresses[0][1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asr-web", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", default="localhost:50051", help="gRPC server HOST:PORT (default: %(default)s)")
    p.add_argument("--server-wait-s", type=float, default=10.0, metavar="SECONDS",
                   help="at start-up, how long to wait for the gRPC server to answer before exiting with "
                        "status 1 (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address the page is served on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="HTTP port, 0 picks a free one (default: %(default)s)")
    p.add_argument("--tls-cert", type=Path, help="certificate (PEM) to serve HTTPS, needed beyond localhost")
    p.add_argument("--tls-key", type=Path, help="private key (PEM) of --tls-cert")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a browser origin (https://app.example:8443) besides the bridge's own that may use "
                        "it; repeatable")
    p.add_argument("--save-audio", type=Path, metavar="DIR",
                   help="save each session's audio as a WAV in DIR (asr-client FILE gives the same finals)")
    p.add_argument("--save-audio-max-seconds", type=float, default=600.0, metavar="SECONDS",
                   help="audio saved per session at most (default: %(default)s)")
    p.add_argument("--save-audio-max-mb", type=float, default=1000.0, metavar="MB",
                   help="no more audio is saved once DIR's files add up to this (default: %(default)s)")
    add_connection_args(p, prefix="grpc-")
    return p


async def wait_for_backend(stub: asr_pb2_grpc.SpeechRecognitionStub, wait_s: float) -> dict:
    """``backend_status``, retried while the server is ``UNAVAILABLE`` for up to ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        status = await backend_status(stub, timeout_s=max(1.0, min(3.0, deadline - time.monotonic())))
        if status["reachable"] or status["code"] != "UNAVAILABLE" or time.monotonic() >= deadline:
            return status
        await asyncio.sleep(0.5)


async def serve(args: argparse.Namespace) -> int:
    context = None
    if args.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.tls_cert, args.tls_key)
    app = create_app(args.connection, args.save_audio, args.allow_origin, args.host,
                     args.save_audio_max_seconds, args.save_audio_max_mb)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()  # opens the gRPC channel
    try:
        status = await wait_for_backend(app[INFO], args.server_wait_s)
        if not status["reachable"]:
            LOG.error("the gRPC server %s does not answer: %s", args.server, status["error"])
            return 1
        site = web.TCPSite(runner, args.host, args.port, ssl_context=context)
        await site.start()
        scheme = "https" if context else "http"
        print(f"asr-web: open {scheme}://{args.host}:{runner.addresses[0][1]}/ (gRPC server {args.server}, "
              f"model {status['model']})", flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="asr-web: %(message)s")
    parser = build_parser()
    args = parse_args(parser, argv, prefix="grpc-")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    try:
        for origin in args.allow_origin:
            normalize_origin(origin)
    except ValueError as exc:
        parser.error(f"--allow-origin: {exc}")
    if args.save_audio_max_seconds <= 0 or args.save_audio_max_mb <= 0 or args.server_wait_s < 0:
        parser.error("--save-audio-max-seconds and --save-audio-max-mb must be positive, --server-wait-s not negative")
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        LOG.error("cannot serve on %s:%s: %s", args.host, args.port, exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
