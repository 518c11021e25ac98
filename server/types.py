"""Plain types every layer shares: stream configuration, results, stats records and the closed
label sets of observations.

A leaf: no torch, no grpc, no pydantic, nothing from the rest of ``server`` but ``server.errors``.
Protocol adapters (``server.api``) convert their messages to and from these types; the recognition
path (``server.core``, ``server.model``) works on them; ``server.observability`` reports them.
Times are in seconds unless a name says otherwise.
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence

from server.errors import ASRError, ErrorCode, invalid


# Audio geometry: the model hears 16 kHz mono in 10 ms feature frames; each step takes a
# 160 ms segment per stream plus 40 ms of look-ahead (right context).

SAMPLE_RATE = 16_000
HOP_LENGTH = 160  # samples per feature frame (10 ms)
SEGMENT_FRAMES = 16
RIGHT_CONTEXT_FRAMES = 4
SEGMENT_SAMPLES = SEGMENT_FRAMES * HOP_LENGTH  # 2560 samples = 160 ms
RIGHT_CONTEXT_SAMPLES = RIGHT_CONTEXT_FRAMES * HOP_LENGTH  # 640 samples = 40 ms
WINDOW_SAMPLES = SEGMENT_SAMPLES + RIGHT_CONTEXT_SAMPLES  # 3200 samples
WINDOW_FRAMES = WINDOW_SAMPLES // HOP_LENGTH + 1  # 21 (centred frames)


# Stream configuration

MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 48000
MAX_REQUEST_ID_CHARS = 128  # a request id is echoed in every response and logged: bounded
MAX_CHANNELS = 8


class DecodingMethod(enum.Enum):
    GREEDY = "greedy"
    BEAM_SEARCH = "beam"


class Encoding(enum.Enum):
    LINEAR16 = "LINEAR16"
    FLOAT32 = "FLOAT32"

    @property
    def sample_width(self) -> int:
        return 2 if self is Encoding.LINEAR16 else 4


@dataclass(frozen=True)
class Endpointing:
    enabled: bool = True
    trailing_silence_ms: int = 800
    max_utterance_ms: int = 30_000


class StreamLimits(Protocol):
    """The server's limits a stream config is checked against (``server.config.ServerSettings``)."""

    max_beam_width: int


@dataclass(frozen=True)
class SpeechContext:
    """Phrases to favour in decoding (contextual biasing): each token of a phrase the decoder
    follows earns ``boost``, in log-probability units; 0 takes the server's ``--default-boost``."""

    phrases: tuple[str, ...]
    boost: float = 0.0


@dataclass(frozen=True)
class StreamConfig:
    """A stream's recognition settings, after defaults are applied; see ``validate``."""

    encoding: Optional[Encoding] = Encoding.LINEAR16
    sample_rate_hertz: int = 16000
    channels: int = 1
    decoding_method: DecodingMethod = DecodingMethod.GREEDY
    beam_width: int = 1
    max_alternatives: int = 1
    interim_results: bool = False
    word_time_offsets: bool = False
    endpointing: Endpointing = field(default_factory=Endpointing)
    request_id: str = ""
    speech_contexts: tuple[SpeechContext, ...] = field(default=(), repr=False)  # boosts resolved (never 0)

    @property
    def phrases(self) -> list[tuple[str, float]]:
        """Every phrase of ``speech_contexts`` with its boost."""
        return [(phrase, c.boost) for c in self.speech_contexts for phrase in c.phrases]

    @property
    def frame_bytes(self) -> int:
        """Bytes of one multi-channel sample frame."""
        assert self.encoding is not None
        return self.encoding.sample_width * self.channels

    def validate(self, settings: StreamLimits) -> "StreamConfig":
        """Raise INVALID_ARGUMENT naming the first offending field; return self when valid."""
        if self.encoding is None:
            raise invalid("config.encoding must be LINEAR16 or FLOAT32")
        if not MIN_SAMPLE_RATE <= self.sample_rate_hertz <= MAX_SAMPLE_RATE:
            raise invalid(f"config.sample_rate_hertz must be between {MIN_SAMPLE_RATE} and "
                          f"{MAX_SAMPLE_RATE}, got {self.sample_rate_hertz}")
        if not 1 <= self.channels <= MAX_CHANNELS:
            raise invalid(f"config.audio_channel_count must be between 1 and {MAX_CHANNELS}, "
                          f"got {self.channels}")
        if not 1 <= self.beam_width <= settings.max_beam_width:
            raise invalid(f"config.beam_width must be between 1 and {settings.max_beam_width}, "
                          f"got {self.beam_width}")
        if not 1 <= self.max_alternatives <= self.beam_width:
            raise invalid(f"config.max_alternatives must be between 1 and the beam width "
                          f"({self.beam_width}), got {self.max_alternatives}")
        if len(self.request_id) > MAX_REQUEST_ID_CHARS:
            raise invalid(f"request_id must be at most {MAX_REQUEST_ID_CHARS} characters")
        ep = self.endpointing
        if ep.enabled and not 80 <= ep.trailing_silence_ms <= 60_000:
            raise invalid("config.endpointing.trailing_silence_ms must be between 80 and 60000")
        if ep.enabled and not 1000 <= ep.max_utterance_ms <= 600_000:
            raise invalid("config.endpointing.max_utterance_ms must be between 1000 and 600000")
        self._validate_phrases(settings)
        return self

    def _validate_phrases(self, settings: ServerSettings) -> None:
        phrases = self.phrases
        if len(phrases) > settings.max_phrases:
            raise invalid(f"speech_contexts carry {len(phrases)} phrases; the limit is {settings.max_phrases} "
                          f"per request (--max-phrases)")
        for phrase, boost in phrases:
            if not phrase.strip():
                raise invalid("speech_contexts: a phrase is empty")
            if len(phrase) > settings.max_phrase_chars:
                raise invalid(f"speech_contexts: a phrase of {len(phrase)} characters is longer than the limit "
                              f"of {settings.max_phrase_chars} (--max-phrase-chars)")
            if not (math.isfinite(boost) and settings.min_boost <= boost <= settings.max_boost):
                raise invalid(f"speech_contexts: boost {boost:g} is outside [{settings.min_boost:g}, "
                              f"{settings.max_boost:g}] (--min-boost, --max-boost; 0 takes --default-boost "
                              f"{settings.default_boost:g})")


# Results

@dataclass
class WordTiming:
    word: str
    start_s: float
    end_s: float


@dataclass
class Alternative:
    transcript: str
    confidence: float
    words: list[WordTiming]


@dataclass
class Result:
    """A transport-free recognition result (times in seconds from the start of the stream)."""

    alternatives: list[Alternative]
    is_final: bool
    stability: float
    start_s: float
    end_s: float
    utterance_index: int
    chunk_ready_at: float  # monotonic time the last sample this result needed arrived
    queue_wait_s: float
    compute_s: float
    batch_size: int

    @property
    def transcript(self) -> str:
        return self.alternatives[0].transcript if self.alternatives else ""


# Stats records (for metrics and logs)

@dataclass
class StreamStats:
    """Per-stream figures for metrics and logs."""

    opened_at: float = field(default_factory=time.monotonic)
    first_audio_at: float | None = None
    audio_seconds: float = 0.0
    compute_seconds: float = 0.0  # this stream's share of the batched steps
    chunks: int = 0
    first_result_at: float | None = None
    input_finished_at: float | None = None

    @property
    def rtf(self) -> float:
        return self.compute_seconds / self.audio_seconds if self.audio_seconds else 0.0


@dataclass
class BatchRecord:
    """What the scheduler saw of one batch (for metrics)."""

    size: int  # chunks in the batch
    seconds: float
    failed: bool
    outputs: Sequence[Any] = ()  # the runner's results for the batch (or its errors)
    streams: int = 0  # distinct streams among the chunks (0: as many as chunks)


@dataclass
class StepStats:
    """Timing of one batched step, for metrics (seconds)."""

    features: float = 0.0
    encoder: float = 0.0
    decoder: float = 0.0
    total: float = 0.0


# Closed label sets of the observations
# Protocols that open sessions (``RecognitionService.open_session(api)``); anything else is reported as "other".

KNOWN_APIS = ("asr.v1", "riva", "google", "openai", "deepgram")


OTHER_API = "other"


def api_label(api: str) -> str:
    """The bounded label value for a protocol name."""
    return api if api in KNOWN_APIS else OTHER_API


class StreamOutcome(enum.Enum):
    """How a stream (a streaming call or a unary Recognize) ended."""

    OK = "ok"  # all results delivered
    CANCELLED = "cancelled"  # the client went away or cancelled
    INVALID = "invalid"  # the client broke a rule: bad config or audio, too long a stream
    REJECTED = "rejected"  # not admitted: stream limit, overload, shutting down, not authorised
    ERROR = "error"  # the server failed (INTERNAL and the like)


_OUTCOME_BY_CODE = {
    ErrorCode.CANCELLED: StreamOutcome.CANCELLED,
    ErrorCode.DEADLINE_EXCEEDED: StreamOutcome.CANCELLED,
    ErrorCode.INVALID_ARGUMENT: StreamOutcome.INVALID,
    ErrorCode.FAILED_PRECONDITION: StreamOutcome.INVALID,
    ErrorCode.OUT_OF_RANGE: StreamOutcome.INVALID,
    ErrorCode.RESOURCE_EXHAUSTED: StreamOutcome.REJECTED,
    ErrorCode.UNAVAILABLE: StreamOutcome.REJECTED,
    ErrorCode.UNAUTHENTICATED: StreamOutcome.REJECTED,
}


def outcome_of(error: BaseException | None) -> StreamOutcome:
    """Classify the exception a stream ended with (``None``: it completed)."""
    if error is None:
        return StreamOutcome.OK
    if isinstance(error, ASRError):
        return _OUTCOME_BY_CODE.get(error.code, StreamOutcome.ERROR)
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return StreamOutcome.CANCELLED
    return StreamOutcome.ERROR


class LimitReason(enum.Enum):
    """Why the server refused or slowed a request. Hooks: ``Observer.limit_hit``."""

    MAX_STREAMS = "max_streams"  # --max-streams reached at admission
    CLIENT_STREAMS = "max_streams_per_client"  # --max-streams-per-client reached at admission
    OVERLOAD = "overload"  # admission refused because the engine cannot keep up
    MAX_MESSAGE_BYTES = "max_message_bytes"  # a message over --max-message-bytes
    MAX_STREAM_SECONDS = "max_stream_seconds"  # a stream over --max-stream-seconds of audio
    MAX_BUFFERED_SECONDS = "max_buffered_seconds"  # backpressure: the client sent too far ahead
    IDLE_TIMEOUT = "idle_timeout"  # a stream sent nothing for too long
    DRAINING = "draining"  # refused because the server is shutting down
    AUTH = "auth"  # refused by authentication / authorisation
    HEALTH_WATCHERS = "max_health_watchers"  # a Health.Watch stream over --max-health-watchers
    MESSAGE_RATE = "max_messages_per_second"  # a browser page's WebSocket over --ws-browser-max-messages-per-second


class FinalTrigger(enum.Enum):
    """What made the server emit a final result."""

    ENDPOINT = "endpoint"  # trailing non-speech or the longest utterance reached
    END_OF_STREAM = "end_of_stream"  # the client half-closed
