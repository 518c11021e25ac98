"""OpenAI Realtime API, transcription mode, at ``/v1/realtime`` of the WebSocket port.

The client sets ``websocket_base_url="ws://host:ws-port/v1"``; the ``openai`` library connects to
``<base>/realtime``. Events (JSON text frames):

- server: ``session.created`` on connect; ``session.updated`` after each ``session.update``.
- ``input_audio_buffer.append`` (base64 PCM16, 24 kHz by default, resampled by the server) feeds
  the connection's session; ``input_audio_buffer.commit`` ends the buffer's input: its final
  transcript is the item's ``...transcription.completed`` (the audio after it is a new session);
  ``input_audio_buffer.clear`` drops the buffer (``input_audio_buffer.cleared``).
- ``turn_detection`` ``server_vad`` (the default) is the server's endpointing: an utterance starts
  with ``input_audio_buffer.speech_started`` (once it has text) and ends, after
  ``silence_duration_ms`` of trailing non-speech, with ``speech_stopped``, ``committed`` and
  ``completed``; ``null`` turns endpointing off (the client commits).
- ``conversation.item.input_audio_transcription.delta`` carries interim text as it grows (append
  only: when the model revises earlier words, deltas pause and ``completed`` has the final text),
  and, an extension, ``audio_end_ms``: the end of the audio that text covers.
- An event the server cannot honour gets an ``error`` event naming the field (``param``); the
  connection stays open. A stream limit, the idle timeout or a drain sends an ``error`` event after
  the final transcript and closes the connection.

What maps and what is refused: docs/compatibility.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Response

from server.api.compat import AudioIntake, check_language
from server.api.websocket import Idle, Segment, WsStream, b64decode, close_code, http_status, json_response
from server.core.service import RecognitionService
from server.errors import ASRError, ErrorCode, shown
from server.types import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, Encoding, Result

log = logging.getLogger(__name__)
API = "openai"
PATH = "/v1/realtime"
AUTH_SCHEMES: tuple[str, ...] = ()
DEFAULT_RATE = 24000  # the protocol's PCM rate
QUERY_ACCEPTED = ("model", "intent")


class EventError(ASRError):
    """An error event: ``param`` names the field, ``error_code`` is OpenAI's ``error.code``."""

    def __init__(self, message: str, param: str | None = None, error_code: str = "invalid_value",
                 code: ErrorCode = ErrorCode.INVALID_ARGUMENT):
        super().__init__(code, message)
        self.param = param
        self.error_code = error_code


def unknown(param: str) -> EventError:
    return EventError(f"{param} is not supported by this server", param, "unknown_parameter")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


# --- handshake ---------------------------------------------------------------------------------
def prepare(service: RecognitionService, query: dict[str, list[str]]) -> dict:
    for name, values in query.items():
        if name not in QUERY_ACCEPTED:
            raise EventError(f"query parameter {shown(name)} is not supported by this server", name,
                             "unknown_parameter")
    intent = query.get("intent", [""])[0]
    if intent not in ("", "transcription"):
        raise EventError(f"intent {shown(intent)} is not supported: this server serves transcription sessions "
                         f"only", "intent")
    return {"model": query.get("model", [""])[0]}


def http_error(connection: ServerConnection, error: ASRError) -> Response:
    return json_response(connection, http_status(error.code), {"error": _error_body(error)})


def _error_body(error: ASRError, event_id: str | None = None) -> dict:
    kind = "invalid_request_error" if error.code in (ErrorCode.INVALID_ARGUMENT, ErrorCode.FAILED_PRECONDITION,
                                                     ErrorCode.OUT_OF_RANGE) else \
        "authentication_error" if error.code is ErrorCode.UNAUTHENTICATED else "server_error"
    code = getattr(error, "error_code", None) or error.code.name.lower()
    return {"type": kind, "code": code, "message": error.message, "param": getattr(error, "param", None),
            "event_id": event_id}


def error_event(error: ASRError) -> dict:
    """OpenAI's ``error`` event for ``error``."""
    return {"type": "error", "event_id": new_id("event"), "error": _error_body(error)}


# --- ephemeral client secrets ------------------------------------------------------------------
_SESSION_FIELDS = ("client_secret", "input_audio_format", "input_audio_transcription", "modalities", "include",
                   "turn_detection", "input_audio_noise_reduction")


def grant(grants, client: str, body: dict, service: RecognitionService) -> dict:
    """``POST /v1/realtime/transcription_sessions``: an ephemeral client secret
    (``client_secret.value`` / ``expires_at``) for one connection to ``/v1/realtime``
    (``server.api.browser``). The session itself is configured on the connection
    (``session.update``): fields asking for more than the defaults are refused naming them."""
    for key in body:
        if key not in _SESSION_FIELDS:
            raise unknown(key)
    ttl = grants.ttl_s
    secret = body.get("client_secret")
    if secret is not None:
        secret = _object(secret, "client_secret")
        _refuse_unknown(secret, ("expires_at",), "client_secret")
        expires = _object(secret.get("expires_at") or {}, "client_secret.expires_at")
        _refuse_unknown(expires, ("anchor", "seconds"), "client_secret.expires_at")
        if expires.get("anchor", "created_at") != "created_at":
            raise EventError("client_secret.expires_at.anchor must be created_at", "client_secret.expires_at.anchor")
        if "seconds" in expires:
            ttl = expires["seconds"]
            if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= grants.ttl_s:
                raise EventError(f"client_secret.expires_at.seconds must be an integer from 1 to {grants.ttl_s:g} "
                                 f"(--ws-token-ttl-seconds), got {shown(ttl)}", "client_secret.expires_at.seconds")
    if body.get("input_audio_format", "pcm16") != "pcm16":
        raise EventError(f"input_audio_format {shown(body['input_audio_format'])} is not supported; send pcm16",
                         "input_audio_format")
    for key in ("include", "turn_detection", "input_audio_noise_reduction"):
        if body.get(key):
            raise EventError(f"{key} is not taken here: set it with session.update once connected", key,
                             "unknown_parameter")
    transcription = body.get("input_audio_transcription")
    if transcription is not None:
        transcription = _object(transcription, "input_audio_transcription")
        _refuse_unknown(transcription, ("model", "language", "prompt"), "input_audio_transcription")
        try:
            check_language(str(transcription.get("language") or ""), "input_audio_transcription.language")
        except ASRError as exc:
            raise EventError(exc.message, "input_audio_transcription.language") from None
    token, expires_at = grants.mint(API, client, float(ttl))
    return {"object": "realtime.transcription_session", "id": new_id("sess"),
            "client_secret": {"value": token, "expires_at": int(expires_at)},
            "input_audio_format": "pcm16", "input_audio_transcription": transcription,
            "modalities": body.get("modalities") or ["text"],
            "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 0,
                               "silence_duration_ms": service.settings.endpoint_silence_ms}}


# --- session configuration ---------------------------------------------------------------------
@dataclass
class Config:
    rate: int = DEFAULT_RATE
    vad: bool = True
    silence_ms: int = 0  # 0: --endpoint-silence-ms
    model: str = ""
    language: str = ""
    prompt: str = ""

    def to_json(self, service: RecognitionService, session_id: str) -> dict:
        return {"type": "transcription", "object": "realtime.transcription_session", "id": session_id,
                "audio": {"input": {
                    "format": {"type": "audio/pcm", "rate": self.rate},
                    "transcription": {"model": self.model or service.description.model_name,
                                      "language": self.language or "en", "prompt": self.prompt},
                    "noise_reduction": None,
                    "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 0,
                                       "silence_duration_ms": self.silence_ms or service.settings.endpoint_silence_ms}
                    if self.vad else None}},
                "include": None}


def _object(value: Any, param: str) -> dict:
    if not isinstance(value, dict):
        raise EventError(f"{param} must be an object", param)
    return value


def _refuse_unknown(obj: dict, known: tuple[str, ...], prefix: str) -> None:
    for key in obj:
        if key not in known:
            raise unknown(f"{prefix}.{key}")


def apply_update(config: Config, session: Any, audio_started: bool) -> Config:
    """``config`` updated by a ``session.update``'s ``session``; EventError names what is refused."""
    session = _object(session, "session")
    _refuse_unknown(session, ("type", "audio", "include", "id", "object", "client_secret"), "session")
    if session.get("type", "transcription") != "transcription":
        raise EventError(f"session.type {shown(session.get('type'))} is not supported: this server serves "
                         f"transcription sessions only", "session.type")
    if session.get("include"):
        raise unknown("session.include")
    new = Config(**vars(config))
    audio = _object(session.get("audio") or {}, "session.audio")
    _refuse_unknown(audio, ("input",), "session.audio")
    inp = _object(audio.get("input") or {}, "session.audio.input")
    _refuse_unknown(inp, ("format", "transcription", "turn_detection", "noise_reduction"), "session.audio.input")
    if inp.get("noise_reduction") is not None:
        raise unknown("session.audio.input.noise_reduction")
    if "format" in inp:
        fmt = _object(inp["format"], "session.audio.input.format")
        _refuse_unknown(fmt, ("type", "rate"), "session.audio.input.format")
        if fmt.get("type", "audio/pcm") != "audio/pcm":
            raise EventError(f"session.audio.input.format.type {shown(fmt.get('type'))} is not supported; "
                             f"send audio/pcm (16-bit PCM)", "session.audio.input.format.type")
        rate = fmt.get("rate", DEFAULT_RATE)
        if not isinstance(rate, int) or not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
            raise EventError(f"session.audio.input.format.rate must be an integer between {MIN_SAMPLE_RATE} "
                             f"and {MAX_SAMPLE_RATE}, got {shown(rate)}", "session.audio.input.format.rate")
        new.rate = rate
    if "transcription" in inp and inp["transcription"] is not None:
        tr = _object(inp["transcription"], "session.audio.input.transcription")
        _refuse_unknown(tr, ("model", "language", "prompt", "delay"), "session.audio.input.transcription")
        try:
            check_language(str(tr.get("language") or ""), "session.audio.input.transcription.language")
        except ASRError as exc:
            raise EventError(exc.message, "session.audio.input.transcription.language") from None
        new.model = str(tr.get("model") or "")
        new.language = str(tr.get("language") or "")
        new.prompt = str(tr.get("prompt") or "")
    if "turn_detection" in inp:
        td = inp["turn_detection"]
        if td is None:
            new.vad = False
        else:
            td = _object(td, "session.audio.input.turn_detection")
            p = "session.audio.input.turn_detection"
            _refuse_unknown(td, ("type", "threshold", "prefix_padding_ms", "silence_duration_ms",
                                 "create_response", "interrupt_response", "idle_timeout_ms"), p)
            if td.get("type") != "server_vad":
                raise EventError(f"{p}.type {shown(td.get('type'))} is not supported; use server_vad or null",
                                 f"{p}.type")
            if td.get("threshold") not in (None, 0.5):
                raise EventError(f"{p}.threshold is not supported (the model's own endpointing decides what "
                                 f"is speech); leave it unset", f"{p}.threshold", "unknown_parameter")
            if td.get("idle_timeout_ms") is not None:
                raise unknown(f"{p}.idle_timeout_ms")
            silence = td.get("silence_duration_ms")
            if silence is not None and (not isinstance(silence, int) or not 80 <= silence <= 60_000):
                raise EventError(f"{p}.silence_duration_ms must be an integer between 80 and 60000, "
                                 f"got {shown(silence)}", f"{p}.silence_duration_ms")
            new.vad, new.silence_ms = True, silence or 0
    if audio_started and (new.rate, new.vad, new.silence_ms) != (config.rate, config.vad, config.silence_ms):
        raise EventError("session.audio.input.format and turn_detection cannot change while the input audio "
                         "buffer holds audio; send input_audio_buffer.commit or input_audio_buffer.clear first",
                         "session.audio.input")
    return new


# --- one connection ----------------------------------------------------------------------------
class Connection:
    def __init__(self, stream: WsStream, options: dict):
        self.stream = stream
        self.service = stream.service
        self.config = Config(model=options.get("model", ""))
        self.session_id = new_id("sess")
        self.last_item: str | None = None

    async def send(self, event: dict) -> None:
        event.setdefault("event_id", new_id("event"))
        await self.stream.send_json(event)

    async def error(self, error: ASRError, event_id: str | None = None) -> None:
        await self.send({"type": "error", "error": _error_body(error, event_id)})

    async def run(self) -> None:
        stream = self.stream
        await self.send({"type": "session.created", "session": self.config.to_json(self.service, self.session_id)})
        output = asyncio.create_task(self.output())
        try:
            while not output.done():
                try:
                    message = await stream.receive()
                except Idle as exc:
                    error = ASRError(ErrorCode.OUT_OF_RANGE, str(exc))
                    await self.error(error)
                    await stream.close(close_code(error.code), "idle")
                    return
                except ASRError as exc:  # a message over the size limit
                    await self.error(exc)
                    await stream.close(close_code(exc.code), exc.code.name)
                    return
                if message is None:
                    break
                event_id = None
                try:
                    if isinstance(message, bytes):
                        raise EventError("binary messages are not part of this protocol; send JSON events")
                    try:
                        event = json.loads(message)
                    except ValueError:
                        raise EventError("the message is not valid JSON", None, "invalid_json") from None
                    if not isinstance(event, dict):
                        raise EventError("an event must be a JSON object", None, "invalid_json")
                    event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
                    await self.handle(event)
                except ASRError as exc:
                    await self.error(exc, event_id)
            if not stream.client_gone:
                await output  # the stream was ended (idle, a limit): its final result, then the error
        finally:
            output.cancel()

    async def handle(self, event: dict) -> None:
        kind = event.get("type")
        stream = self.stream
        if kind == "input_audio_buffer.append":
            data = b64decode(event.get("audio"), "audio")
            segment = stream.current or stream.open_segment()
            if not segment.started:
                self.start(segment)
            await stream.feed(segment, data)
        elif kind == "input_audio_buffer.commit":
            segment = stream.current
            if segment is None or not segment.started or segment.frames == 0:
                raise EventError("the input audio buffer is empty: append audio before committing", None,
                                 "input_audio_buffer_commit_empty")
            item = segment.state.setdefault("item", new_id("item"))
            segment.state["committed"] = True
            await self.send({"type": "input_audio_buffer.committed", "item_id": item,
                             "previous_item_id": self.last_item})
            self.last_item = item
            stream.end_segment()
        elif kind == "input_audio_buffer.clear":
            segment = stream.current
            if segment is not None:
                segment.cleared = True
                segment.session.fail(ASRError(ErrorCode.CANCELLED, "the input audio buffer was cleared"))
                stream.segments = []
            await self.send({"type": "input_audio_buffer.cleared"})
        elif kind == "session.update":
            segment = stream.current
            started = segment is not None and segment.started and segment.frames > 0
            self.config = apply_update(self.config, event.get("session"), started)
            if segment is not None and not segment.started:
                pass  # started with the new config on its first audio
            await self.send({"type": "session.updated", "session": self.config.to_json(self.service, self.session_id)})
        elif kind in ("transcription_session.update", "response.create", "conversation.item.create"):
            raise EventError(f"type {shown(kind)} is not supported: this server serves transcription sessions "
                             f"(session.update with session.type transcription)", "type", "unknown_event")
        else:
            raise EventError(f"type {shown(kind)} is not a client event this server knows", "type", "unknown_event")

    def start(self, segment: Segment) -> None:
        c = self.config
        segment.session.start(self.service.stream_config(
            encoding=Encoding.LINEAR16, sample_rate_hertz=c.rate, channels=1, method=None, beam_width=0,
            max_alternatives=1, interim_results=True, word_time_offsets=False, endpointing_disabled=not c.vad,
            trailing_silence_ms=c.silence_ms))
        segment.intake = AudioIntake(segment.session, "session.audio.input.format audio/pcm", None)
        segment.state["vad"] = c.vad
        log.info("openai stream %d started (%s)", segment.session.id, segment.session.config)

    async def output(self) -> None:
        try:
            async for segment, result in self.stream.results():
                if result is None:
                    state = segment.state
                    if state.get("committed") and "item" in state:  # committed, no text since
                        await self.completed(state["item"], "", 0.0)
                    continue
                await self.on_result(segment, result)
        except ASRError as exc:
            await self.error(exc)
            await self.stream.close(close_code(exc.code), exc.code.name)

    async def on_result(self, segment: Segment, r: Result) -> None:
        state = segment.state
        item = state.setdefault("item", new_id("item"))
        ms = lambda s: int(round((segment.offset_s + s) * 1000))  # noqa: E731
        if state["vad"] and not state.get("speech_started"):
            state["speech_started"] = True
            await self.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": ms(r.start_s),
                             "item_id": item})
        text, sent = r.transcript, state.get("sent", "")
        if len(text) > len(sent) and text.startswith(sent):
            # audio_end_ms: an extension (the protocol's delta has no timing; clients ignore it), the
            # end of the audio the text covers, for a client's chunk latency (asr-loadtest)
            await self.send({"type": "conversation.item.input_audio_transcription.delta", "item_id": item,
                             "content_index": 0, "delta": text[len(sent):], "audio_end_ms": ms(r.end_s)})
            state["sent"] = text
        if not r.is_final:
            return
        if state["vad"] and not state.get("committed"):
            await self.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": ms(r.end_s),
                             "item_id": item})
            await self.send({"type": "input_audio_buffer.committed", "item_id": item,
                             "previous_item_id": self.last_item})
            self.last_item = item
        await self.completed(item, text, r.end_s - r.start_s)
        vad = state["vad"]
        state.clear()
        state["vad"] = vad

    async def completed(self, item: str, transcript: str, seconds: float) -> None:
        await self.send({"type": "conversation.item.input_audio_transcription.completed", "item_id": item,
                         "content_index": 0, "transcript": transcript,
                         "usage": {"type": "duration", "seconds": round(seconds, 3)}})


async def serve(stream: WsStream, options: dict) -> None:
    await Connection(stream, options).run()
