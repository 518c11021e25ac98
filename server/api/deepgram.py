"""Deepgram live streaming (``/v1/listen``) on the WebSocket port.

The handshake's query parameters configure the stream (a parameter the server cannot honour is
refused with HTTP 400 and Deepgram's error body and ``dg-error`` header naming it); binary frames
carry the audio (``encoding=linear16`` with ``sample_rate``, or, without ``encoding``, a WAV file
whose header gives the format); text frames carry ``KeepAlive``, ``Finalize`` and ``CloseStream``.
The server answers with ``Results`` (``is_final`` on the final result of an utterance,
``speech_final`` when the endpointing ended it, ``from_finalize`` after a ``Finalize``),
``SpeechStarted`` (``vad_events=true``), ``UtteranceEnd`` (``utterance_end_ms``, after each
utterance's final result) and, once the stream is closed, ``Metadata``. An error mid-stream is an
``Error`` message, then the connection closes (1008 for a client's error, 1011 for the server's,
1001 when it shuts down).

Phrases to favour (contextual biasing, docs/biasing.md): ``keyterm`` (repeatable, Nova-3's key
term prompting: the whole value is the phrase, at the server's default boost) and ``keywords``
(repeatable, ``WORD`` or ``WORD:BOOST``, the older models' form; the boost in the server's units)
become the stream's speech contexts, under the same limits as the gRPC APIs', checked at the
handshake (HTTP 400 naming the parameter).

What maps and what is refused: docs/compatibility.md.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import time
import uuid
from dataclasses import dataclass

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Response

from server.api.compat import AudioIntake, check_language, parse_wav_header
from server.api.websocket import Idle, Segment, WsStream, close_code, http_status, json_response
from server.core.service import RecognitionService
from server.errors import ASRError, ErrorCode, invalid, shown
from server.model.context_graph import PhraseError
from server.types import (MAX_CHANNELS, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, Encoding, LimitReason, Result, SpeechContext,
                          StreamConfig)

log = logging.getLogger(__name__)
API = "deepgram"
PATH = "/v1/listen"
AUTH_SCHEMES = ("token",)  # Deepgram API keys are sent as "Token <key>"
MIN_ENDPOINTING_MS = 80  # the server's shortest trailing silence
MODEL_UUID = "00000000-0000-0000-0000-000000000000"

# accepted: their effect would show in the text (formatting) or they only describe the request
_NO_EFFECT = ("model", "punctuate", "smart_format", "numerals", "dictation", "filler_words", "tag", "extra",
              "mip_opt_out", "version")
_HONOURED = ("encoding", "sample_rate", "channels", "interim_results", "endpointing", "utterance_end_ms",
             "vad_events", "language", "keyterm", "keywords")
_FALSE_ONLY = ("multichannel", "profanity_filter", "diarize", "detect_entities")  # refused when true


@dataclass
class Options:
    encoding: str | None = None
    sample_rate: int = 0
    channels: int = 1
    interim_results: bool = False
    endpointing: bool = True
    endpointing_ms: int = 0  # 0: --endpoint-silence-ms
    utterance_end_ms: int = 0
    vad_events: bool = False
    model: str = ""
    request_id: str = ""
    speech_contexts: tuple[SpeechContext, ...] = ()  # keyterm / keywords (boost 0: --default-boost)


def _bool(query: dict, name: str) -> bool:
    value = query[name][-1].lower()
    if value not in ("true", "false"):
        raise invalid(f"{name} must be true or false, got {shown(value)}")
    return value == "true"


def _int(query: dict, name: str, low: int, high: int) -> int:
    value = query[name][-1]
    try:
        number = int(value)
    except ValueError:
        raise invalid(f"{name} must be an integer, got {shown(value)}") from None
    if not low <= number <= high:
        raise invalid(f"{name} must be between {low} and {high}, got {number}")
    return number


def prepare(service: RecognitionService, query: dict[str, list[str]]) -> Options:
    o = Options(request_id=str(uuid.uuid4()))
    for name in query:
        if name in _FALSE_ONLY:
            if _bool(query, name):
                raise invalid(f"{name}=true is not supported by this server")
        elif name not in _HONOURED and name not in _NO_EFFECT:
            raise invalid(f"{shown(name)} is not supported by this server")
    if "encoding" in query:
        o.encoding = query["encoding"][-1].lower()
        if o.encoding != "linear16":
            raise invalid(f"encoding {shown(o.encoding)} is not supported; send linear16 (or a WAV file "
                          f"without encoding)")
        if "sample_rate" not in query:
            raise invalid("sample_rate is required with encoding=linear16")
    if "sample_rate" in query:
        o.sample_rate = _int(query, "sample_rate", MIN_SAMPLE_RATE, MAX_SAMPLE_RATE)
    if "channels" in query:
        o.channels = _int(query, "channels", 1, MAX_CHANNELS)
    if "interim_results" in query:
        o.interim_results = _bool(query, "interim_results")
    if "endpointing" in query:
        value = query["endpointing"][-1].lower()
        if value in ("false", "true"):
            o.endpointing = value == "true"
        else:
            o.endpointing_ms = max(MIN_ENDPOINTING_MS, _int(query, "endpointing", 0, 60_000))
    if "utterance_end_ms" in query:
        o.utterance_end_ms = _int(query, "utterance_end_ms", 1000, 60_000)
        if not o.interim_results:
            raise invalid("utterance_end_ms needs interim_results=true")
    if "vad_events" in query:
        o.vad_events = _bool(query, "vad_events")
    if "language" in query:
        check_language(query["language"][-1], "language")
    o.model = query.get("model", [""])[-1]
    o.speech_contexts = _speech_contexts(service, query)
    return o


def _speech_contexts(service: RecognitionService, query: dict[str, list[str]]) -> tuple[SpeechContext, ...]:
    """``keyterm`` (each value one phrase, at the default boost: Deepgram takes the whole value as the
    term, a ``:weight`` included) and ``keywords`` (``WORD`` or ``WORD:BOOST``) as speech contexts,
    checked against the server's phrase limits and the model's vocabulary."""
    contexts = [SpeechContext((term,)) for term in query.get("keyterm", [])]
    for value in query.get("keywords", []):
        word, colon, boost = value.rpartition(":")
        if not colon:
            word, boost = value, ""
        try:
            number = float(boost) if boost else 0.0
        except ValueError:
            raise invalid(f"keywords: {shown(value)} must be WORD or WORD:BOOST with a number as the boost") from None
        contexts.append(SpeechContext((word,), number))
    if not contexts:
        return ()
    names = " / ".join(n for n in ("keyterm", "keywords") if n in query)
    s = service.settings
    resolved = tuple(SpeechContext(c.phrases, c.boost or s.default_boost) for c in contexts)
    try:
        StreamConfig(speech_contexts=resolved).validate(s)
        service.engine.context_phrases([(c.phrases[0], c.boost) for c in resolved])
    except ASRError as exc:
        raise invalid(f"{names}: {exc.message.removeprefix('speech_contexts: ')}") from None
    except PhraseError as exc:
        raise invalid(f"{names}: {exc}") from None
    return tuple(contexts)


def http_error(connection: ServerConnection, error: ASRError) -> Response:
    return json_response(connection, http_status(error.code),
                         {"err_code": _err_code(error), "err_msg": error.message, "request_id": str(uuid.uuid4())},
                         {"dg-error": error.message})


def error_event(error: ASRError) -> dict:
    """Deepgram's ``Error`` message for ``error``."""
    return {"type": "Error", "variant": _err_code(error), "code": error.code.name, "description": error.message,
            "message": error.message}


def grant(grants, client: str, body: dict, service: RecognitionService) -> dict:
    """``POST /v1/auth/grant``: Deepgram's temporary token, ``{"access_token", "expires_in"}``,
    for one connection to ``/v1/listen`` (``server.api.browser``)."""
    ttl = grants.ttl_s
    for key in body:
        if key != "ttl_seconds":
            raise invalid(f"{shown(key)} is not supported by this server (the body takes ttl_seconds)")
    if body.get("ttl_seconds") is not None:
        ttl = body["ttl_seconds"]
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 1 <= ttl <= grants.ttl_s:
            raise invalid(f"ttl_seconds must be a number from 1 to {grants.ttl_s:g} (--ws-token-ttl-seconds), "
                          f"got {shown(ttl)}")
    token, _ = grants.mint(API, client, float(ttl))
    return {"access_token": token, "expires_in": ttl}


def _err_code(error: ASRError) -> str:
    return {ErrorCode.INVALID_ARGUMENT: "Bad Request", ErrorCode.UNAUTHENTICATED: "INVALID_AUTH",
            ErrorCode.RESOURCE_EXHAUSTED: "TOO_MANY_REQUESTS", ErrorCode.UNAVAILABLE: "SERVICE_UNAVAILABLE",
            ErrorCode.OUT_OF_RANGE: "DATA-0001", ErrorCode.FAILED_PRECONDITION: "Bad Request"}.get(
                error.code, "INTERNAL_SERVER_ERROR")


class Connection:
    def __init__(self, stream: WsStream, options: Options):
        self.stream = stream
        self.service = stream.service
        self.o = options
        self.total_s = 0.0
        self.audio_at = time.monotonic()  # the last audio (or the opening): bounds KeepAlive
        self.kept_too_long = False

    async def error(self, error: ASRError) -> None:
        await self.stream.send_json(error_event(error))
        await self.stream.close(close_code(error.code), _err_code(error))

    def start(self, segment: Segment, data: bytes) -> None:
        o = self.o
        rate, channels = o.sample_rate, o.channels
        if o.encoding is None:
            wav = parse_wav_header(data)
            if wav is None:
                raise invalid("the audio is not a WAV file: without encoding, send a WAV file (its header "
                              "gives the format), or set encoding=linear16 and sample_rate")
            rate, channels = wav.sample_rate, wav.channels
            if o.sample_rate and o.sample_rate != rate:
                raise invalid(f"sample_rate ({o.sample_rate}) must match the WAV header ({rate})")
        segment.session.start(self.service.stream_config(
            encoding=Encoding.LINEAR16, sample_rate_hertz=rate, channels=channels, method=None, beam_width=0,
            max_alternatives=1, interim_results=o.interim_results, word_time_offsets=True,
            endpointing_disabled=not o.endpointing, trailing_silence_ms=o.endpointing_ms,
            request_id=o.request_id, speech_contexts=o.speech_contexts))
        segment.intake = AudioIntake(segment.session, "encoding linear16", None)  # a WAV header: checked, skipped
        log.info("deepgram stream %d started (%s)", segment.session.id, segment.session.config)

    async def run(self) -> None:
        stream = self.stream
        output = asyncio.create_task(self.output())
        try:
            while not output.done() and not stream.input_ended:
                try:
                    message = await stream.receive()
                except Idle as exc:
                    await self.error(ASRError(ErrorCode.OUT_OF_RANGE, str(exc)))
                    return
                if message is None:
                    break
                if isinstance(message, bytes):
                    if not message:
                        continue
                    segment = stream.current or stream.open_segment()
                    if not segment.started:
                        self.start(segment, message)
                    self.audio_at = time.monotonic()
                    await stream.feed(segment, message)
                    continue
                try:
                    kind = json.loads(message).get("type")
                except (ValueError, AttributeError):
                    kind = None
                if kind == "KeepAlive":
                    self.keep_alive(stream.current)
                elif kind == "Finalize":
                    segment = stream.end_segment()
                    if segment is not None:
                        segment.state["finalize"] = True
                elif kind == "CloseStream":
                    stream.end_input()
                else:
                    raise invalid(f"a text message must be KeepAlive, Finalize or CloseStream, got type "
                                  f"{shown(kind)}")
            if not stream.client_gone:
                await output
        except ASRError as exc:
            if not output.done():
                output.cancel()
            await self.error(exc)
        finally:
            output.cancel()

    def keep_alive(self, segment: Segment | None) -> None:
        """KeepAlive keeps the stream open without audio (its idle credit full), for at most
        ``--ws-max-keepalive-seconds`` since the last audio: the first KeepAlive after that ends the
        stream, with the final result of its audio, then OUT_OF_RANGE."""
        if self.kept_too_long:
            return
        now, limit = time.monotonic(), self.service.settings.ws_max_keepalive_seconds
        started = segment is not None and segment.started
        if now - self.audio_at <= limit:
            if started:
                segment.session.pace.refill(now)
            return
        self.kept_too_long = True
        self.service.observer.limit_hit(LimitReason.IDLE_TIMEOUT)
        error = ASRError(ErrorCode.OUT_OF_RANGE, f"no audio for {now - self.audio_at:.0f} s: KeepAlive holds a "
                         f"stream open without audio for at most {limit:g} s (--ws-max-keepalive-seconds)")
        if not (started and segment.session.end_input(error)):  # else: the final result, then the error
            raise error

    async def output(self) -> None:
        try:
            async for segment, result in self.stream.results():
                if result is None:
                    self.total_s = segment.offset_s + segment.seconds
                    continue
                await self.on_result(segment, result)
            await self.stream.send_json(self.metadata())
            await self.stream.close()
        except ASRError as exc:
            await self.error(exc)

    async def on_result(self, segment: Segment, r: Result) -> None:
        o, state, offset = self.o, segment.state, segment.offset_s
        if o.vad_events and not state.get("speech"):
            state["speech"] = True
            await self.stream.send_json({"type": "SpeechStarted", "channel": [0], "timestamp": round(offset + r.start_s, 3)})
        at_end = getattr(segment.session, "_at_end", False)  # the final at the end of the segment's input
        alt = r.alternatives[0]
        words = [{"word": w.word, "start": round(offset + w.start_s, 3), "end": round(offset + w.end_s, 3),
                  "confidence": alt.confidence if r.is_final else 0.0, "punctuated_word": w.word}
                 for w in alt.words]
        await self.stream.send_json({
            "type": "Results", "channel_index": [0, 1], "duration": round(r.end_s - r.start_s, 3),
            "start": round(offset + r.start_s, 3), "is_final": r.is_final,
            "speech_final": r.is_final and not at_end, "from_finalize": bool(r.is_final and at_end and state.get("finalize")),
            "channel": {"alternatives": [{"transcript": alt.transcript, "confidence": alt.confidence, "words": words}]},
            "metadata": {"request_id": o.request_id, "model_uuid": MODEL_UUID,
                         "model_info": {"name": self.service.description.model_name,
                                        "version": self.service.description.version, "arch": "emformer-rnnt"}}})
        if r.is_final:
            state.pop("speech", None)
            if o.utterance_end_ms:
                await self.stream.send_json({"type": "UtteranceEnd", "channel": [0, 1],
                                             "last_word_end": round(offset + (alt.words[-1].end_s if alt.words else r.end_s), 3)})

    def metadata(self) -> dict:
        d = self.service.description
        return {"type": "Metadata", "transaction_key": "deprecated", "request_id": self.o.request_id,
                "sha256": "", "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "duration": round(self.total_s, 3), "channels": self.o.channels, "models": [MODEL_UUID],
                "model_info": {MODEL_UUID: {"name": d.model_name, "version": d.version, "arch": "emformer-rnnt"}}}


async def serve(stream: WsStream, options: Options) -> None:
    await Connection(stream, options).run()
