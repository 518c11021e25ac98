"""Observation hooks of the recognition path, in plain Python (no metrics library).

The hot path (sessions, session manager, scheduler callback, servicers' error
mapping) reports what happened to an ``Observer`` as plain values and stats
records (``StreamStats``, ``BatchRecord``, ``StepStats``). The base ``Observer``
ignores everything, so code and tests that do not care need nothing;
``server.observability.metrics.PrometheusObserver`` maps the same calls onto Prometheus metrics,
and is the only place that knows about prometheus_client.

Every label value a hook can produce is a member of a closed set (``server.types``:
``KNOWN_APIS``, ``StreamOutcome``, ``LimitReason``, ``FinalTrigger``,
``ErrorCode``), so the metrics can initialise all series at start-up and no
unbounded value (a session id, a request id, a message) ever becomes a label.
All hooks are called on the event-loop thread and must be cheap.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

from server.errors import ErrorCode
from server.types import BatchRecord, FinalTrigger, LimitReason, StepStats, StreamOutcome, StreamStats


class Observer:
    """Receives observations from the recognition path; this base class ignores them.

    Subclass and override what you need (``server.observability.metrics.PrometheusObserver``).
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
