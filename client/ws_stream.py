"""Streaming over the server's WebSocket port (``--ws-port``) for the load tester: OpenAI Realtime
transcription (``/v1/realtime``) and Deepgram live streaming (``/v1/listen``), as plain WebSocket
clients speaking each wire protocol. It never imports server code.

``ws_stream_audio`` paces LINEAR16 audio like ``client.stream.stream_audio`` (160 ms messages in
real time) and yields ``WsEvent``s: each result with its client-side chunk latency, from sending
the last byte the result needed (its end time plus the model's look-ahead) to its arrival, the
measure ``client.stream`` takes for gRPC. Deepgram ``Results`` (interim results on) carry their end
time (``start + duration``), one per recognised chunk; OpenAI's transcription ``delta`` events
carry none in the protocol, so the server adds ``audio_end_ms`` to them (an extension clients
ignore; docs/compatibility.md) and a delta, sent when the text grows, is measured. Neither
protocol carries the server's own timing (queue wait, batch, compute).
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import json
import ssl
import time
from dataclasses import dataclass
from typing import AsyncIterator

import websockets

from client.connection import Connection
from client.stream import RIGHT_CONTEXT_S, SendLog, StreamOptions, _paced

PROTOCOLS = ("grpc", "ws-openai", "ws-deepgram")
PATHS = {"ws-openai": "/v1/realtime", "ws-deepgram": "/v1/listen"}
COMPLETED = "conversation.item.input_audio_transcription.completed"


class WsStreamError(Exception):
    """The stream ended with an error: ``code`` as the protocol names it (or ``HTTP_<status>``)."""

    def __init__(self, code: str, message: str = ""):
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code


@dataclass
class WsEvent:
    received_at: float  # time.monotonic()
    client_latency_s: float | None  # of the newest chunk the result covers (None: it covers none)
    is_final: bool
    transcript: str


def ws_url(connection: Connection, protocol: str, query: str = "") -> str:
    """``ws[s]://HOST:PORT/<path>`` of ``protocol`` on the server at ``connection.address``
    (``HOST:PORT`` of the WebSocket port, or a ws:// / wss:// URL whose path is replaced)."""
    address = connection.address
    if address.startswith(("ws://", "wss://")):
        scheme, _, rest = address.partition("://")
        address = rest.split("/", 1)[0]
    else:
        scheme = "wss" if connection.tls else "ws"
    return f"{scheme}://{address}{PATHS[protocol]}" + (f"?{query}" if query else "")


def ssl_context(connection: Connection) -> ssl.SSLContext | None:
    if not connection.tls and not connection.address.startswith("wss://"):
        return None
    context = ssl.create_default_context(cadata=connection.ca.decode() if connection.ca else None)
    if connection.cert:
        import tempfile  # ssl loads a certificate chain from files only
        with tempfile.NamedTemporaryFile() as cert, tempfile.NamedTemporaryFile() as key:
            cert.write(connection.cert), cert.flush()
            key.write(connection.key), key.flush()
            context.load_cert_chain(cert.name, key.name)
    return context


def _connect(connection: Connection, protocol: str, query: str = ""):
    headers = {"Authorization": f"Bearer {connection.token}"} if connection.token else {}
    return websockets.connect(ws_url(connection, protocol, query), additional_headers=headers,
                              ssl=ssl_context(connection), max_size=16 << 20, compression=None,
                              server_hostname=connection.server_name)


def _latency(log: SendLog, end_s: float, now: float) -> float | None:
    if not log.sent_at:
        return None
    idx = bisect.bisect_left(log.chunk_end_s, end_s + RIGHT_CONTEXT_S - 1e-6)
    return now - log.sent_at[min(idx, len(log.sent_at) - 1)]


async def ws_stream_audio(connection: Connection, protocol: str, pcm: bytes, sample_rate: int,
                          options: StreamOptions, channels: int = 1,
                          send_log: SendLog | None = None) -> AsyncIterator[WsEvent]:
    """Stream LINEAR16 ``pcm`` over ``protocol`` (``ws-openai`` or ``ws-deepgram``) and yield each
    result with its client-side timing; ``WsStreamError`` when the server refuses or ends the
    stream with an error."""
    log = send_log if send_log is not None else SendLog()
    bytes_per_second = sample_rate * 2 * channels
    frame = 2 * channels
    chunk_bytes = max(frame, int(bytes_per_second * options.chunk_ms / 1000) // frame * frame)
    streams = {"ws-openai": _openai, "ws-deepgram": _deepgram}
    if protocol not in streams:
        raise ValueError(f"protocol must be one of {', '.join(PATHS)}, not {protocol!r}")
    if protocol == "ws-openai" and channels != 1:
        raise WsStreamError("INVALID_ARGUMENT", "OpenAI Realtime takes mono audio only")
    try:
        async for event in streams[protocol](connection, pcm, sample_rate, channels, options, chunk_bytes,
                                             bytes_per_second, log):
            yield event
    except websockets.InvalidStatus as exc:
        raise WsStreamError(f"HTTP_{exc.response.status_code}", exc.response.body.decode("utf-8", "replace")
                            .strip()[:200]) from None
    except websockets.ConnectionClosedError as exc:
        raise WsStreamError(f"CLOSED_{exc.rcvd.code if exc.rcvd else 1006}") from None


async def _send_audio(ws, pcm, chunk_bytes, bytes_per_second, realtime, log: SendLog, wrap) -> None:
    sent = 0
    async for chunk in _paced(pcm, bytes_per_second, chunk_bytes, realtime):
        await ws.send(wrap(chunk))
        sent += len(chunk)
        log.chunk_end_s.append(sent / bytes_per_second)
        log.sent_at.append(time.monotonic())
    log.finished_at = time.monotonic()


async def _deepgram(connection, pcm, rate, channels, options: StreamOptions, chunk_bytes, bytes_per_second, log):
    query = (f"encoding=linear16&sample_rate={rate}&channels={channels}"
             f"&interim_results={str(options.interim_results).lower()}"
             f"&endpointing={str(options.endpointing).lower()}")
    async with _connect(connection, "ws-deepgram", query) as ws:
        async def send():
            await _send_audio(ws, pcm, chunk_bytes, bytes_per_second, options.realtime, log, bytes)
            await ws.send(json.dumps({"type": "CloseStream"}))

        sender = asyncio.create_task(send())
        try:
            async for message in ws:
                now = time.monotonic()
                m = json.loads(message)
                if m.get("type") == "Results":
                    yield WsEvent(now, _latency(log, m["start"] + m["duration"], now), m["is_final"],
                                  m["channel"]["alternatives"][0]["transcript"])
                elif m.get("type") == "Error":
                    raise WsStreamError(m.get("code") or m.get("variant") or "ERROR", m.get("description", ""))
                elif m.get("type") == "Metadata":
                    break
        finally:
            sender.cancel()


async def _openai(connection, pcm, rate, channels, options: StreamOptions, chunk_bytes, bytes_per_second, log):
    async with _connect(connection, "ws-openai") as ws:
        turns = {"type": "server_vad"} if options.endpointing else None
        await ws.send(json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {
            "input": {"format": {"type": "audio/pcm", "rate": rate}, "turn_detection": turns}}}}))
        wrap = lambda chunk: json.dumps({"type": "input_audio_buffer.append",  # noqa: E731
                                         "audio": base64.b64encode(chunk).decode()})
        last_item: list[str] = []

        async def send():
            await _send_audio(ws, pcm, chunk_bytes, bytes_per_second, options.realtime, log, wrap)
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))

        sender = asyncio.create_task(send())
        try:
            async for message in ws:
                now = time.monotonic()
                m = json.loads(message)
                kind = m.get("type")
                if kind == "conversation.item.input_audio_transcription.delta":
                    end = m.get("audio_end_ms")
                    yield WsEvent(now, None if end is None else _latency(log, end / 1000, now), False, m["delta"])
                elif kind == COMPLETED:
                    yield WsEvent(now, None, True, m["transcript"])
                    if last_item and m["item_id"] == last_item[0]:
                        break  # the committed end of the audio
                elif kind == "input_audio_buffer.committed" and log.finished_at is not None:
                    last_item[:] = [m["item_id"]]
                elif kind == "error":
                    error = m["error"]
                    if error.get("code") == "input_audio_buffer_commit_empty":
                        break  # the last turn ended right at the end of the audio: nothing left
                    raise WsStreamError(str(error.get("code") or "error").upper(), error.get("message", ""))
        finally:
            sender.cancel()


async def ws_model_name(connection: Connection, protocol: str, timeout: float = 10.0) -> str:
    """The server's model as ``protocol`` reports it (OpenAI's session.created, Deepgram's Metadata)."""
    async with asyncio.timeout(timeout):
        if protocol == "ws-openai":
            async with _connect(connection, protocol) as ws:
                created = json.loads(await ws.recv())
                return created["session"]["audio"]["input"]["transcription"]["model"]
        async with _connect(connection, protocol, "encoding=linear16&sample_rate=16000") as ws:
            await ws.send(json.dumps({"type": "CloseStream"}))
            async for message in ws:
                m = json.loads(message)
                if m.get("type") == "Metadata":
                    return next(iter(m["model_info"].values()))["name"]
    raise WsStreamError("NO_METADATA", "the server closed without Metadata")
