"""Observation hooks of the recognition path, in plain Python (no metrics library).

The hot path (sessions, session manager, scheduler callback, servicers' error
mapping) reports what happened to an ``Observer`` as plain values and stats
records (``StreamStats``, ``BatchRecord``, ``StepStats``). The base ``Observer``
ignores everything, so code and tests that do not care need nothing;
``server.metrics.PrometheusObserver`` maps the same calls onto Prometheus metrics,
and is the only place that knows about prometheus_client.

Every label value a hook can produce is a member of a closed set defined here
(``KNOWN_APIS``, ``StreamOutcome``, ``LimitReason``, ``FinalTrigger``,
``ErrorCode``), so the metrics can initialise all series at start-up and no
unbounded value (a session id, a request id, a message) ever becomes a label.
All hooks are called on the event-loop thread and must be cheap.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import threading
import time
from typing import TYPE_CHECKING, Any

from server.errors import ASRError, ErrorCode

if TYPE_CHECKING:  # plain records only; no import cycle at run time
    from server.engine import StepStats
    from server.scheduler import BatchRecord
    from server.session import StreamStats

# Protocols that open sessions (``RecognitionService.open_session(api)``); anything
# else is reported as "other".
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


class FinalTrigger(enum.Enum):
    """What made the server emit a final result."""

    ENDPOINT = "endpoint"  # trailing non-speech or the longest utterance reached
    END_OF_STREAM = "end_of_stream"  # the client half-closed


class Observer:
    """Receives observations from the recognition path; this base class ignores them.

    Subclass and override what you need (``server.metrics.PrometheusObserver``).
    Durations are in seconds.
    """

    def chunk_done(self, api: str, latency_s: float, queue_wait_s: float, audio_s: float) -> None:
        """A stream's chunk was recognised: ``latency_s`` from the arrival of the last sample it
        needed (look-ahead included) to its result; ``audio_s`` of new audio it covered."""

    def first_result(self, api: str, seconds: float) -> None:
        """A stream's first result (interim or final), ``seconds`` after its first audio arrived."""

    def final_result(self, api: str, trigger: FinalTrigger, seconds: float) -> None:
        """A final result, ``seconds`` after the server had all audio it needed: the arrival of the
        chunk that completed the endpoint, or the client's half-close."""

    def stream_ended(self, api: str, outcome: StreamOutcome, stats: StreamStats | None) -> None:
        """A stream ended (``stats`` is None when it was never admitted)."""

    def batch_done(self, record: BatchRecord, step: StepStats | None) -> None:
        """The scheduler finished a batch (``step``: the engine's own timings, None on failure)."""

    def limit_hit(self, reason: LimitReason) -> None:
        """A limit refused or slowed a request."""

    def error_returned(self, code: ErrorCode) -> None:
        """An RPC ended with this non-OK status."""


class EngineLoad:
    """The engine's recent real-time factor: busy seconds / audio seconds advanced, over a
    sliding window. Thread-safe: fed on the event loop, read by a metrics scrape."""

    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self._steps: collections.deque[tuple[float, float, float]] = collections.deque()
        self._lock = threading.Lock()

    def add(self, busy_s: float, audio_s: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._steps.append((now, busy_s, audio_s))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._steps and self._steps[0][0] < now - self.window_s:
            self._steps.popleft()

    def rtf(self, now: float | None = None) -> float:
        """Busy / audio over the window; 0 when nothing ran in it."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            busy = sum(s[1] for s in self._steps)
            audio = sum(s[2] for s in self._steps)
        return busy / audio if audio else 0.0


def first_step_stats(outputs: Any) -> StepStats | None:
    """The engine's ``StepStats`` of a batch, from the runner outputs the scheduler recorded."""
    for output in outputs or ():
        stats = getattr(output, "step_stats", None)
        if stats is not None:
            return stats
    return None
