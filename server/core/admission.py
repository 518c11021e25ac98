"""Admission control: whether a new stream may start, decided in one place, at once.

``Admission.check`` is asked by the ``SessionManager`` before a stream (or a unary
Recognize) gets a session; a refusal costs the server nothing beyond the answer. In order:

1. the server is draining (SIGTERM)                -> ``UNAVAILABLE`` (reason ``draining``);
2. ``--max-streams`` streams are open               -> ``RESOURCE_EXHAUSTED`` (``max_streams``);
   the client (its token, else its address) holds ``--max-streams-per-client``
                                                    -> ``RESOURCE_EXHAUSTED`` (``max_streams_per_client``);
3. load shedding (``--latency-budget-ms`` > 0): one more stream would make the admitted
   streams miss their chunk-latency budget          -> ``RESOURCE_EXHAUSTED`` (``overload``);
   a server with no stream open always admits one (refusing it would serve nobody).

The load model (docs/operations.md, "Admission and load shedding"). With continuous
batching, ``n`` real-time streams each bring one chunk per period ``P`` (160 ms). A step
of ``B`` chunks costs ``s(B) = c0 + c*B``. A chunk that arrives just after a step began
waits for that step and rides the next, so its latency is up to two steps:

- streams at random phases: the engine runs back to back with steps of
  ``T = c0 / (1 - rho)``, ``rho = n*c/P``: latency up to ``2T``;
- streams whose phases fall into two groups (they started together): the two steps hold
  all ``n`` chunks between them: latency up to ``2*c0 + c*n``;
- what the engine does now, whatever the model says (a slower machine, bursts):
  ``2 * (T_recent + c)``, ``T_recent`` the median duration of the engine steps of the
  last two seconds, each counted as if its streams had brought one chunk each (a stream
  sent faster than real time brings up to four per step while it catches up, and is
  gone when it has: its long steps say nothing about the load of real-time streams).

``n`` is the load of the open streams in real-time streams (``server.core.pace``): each counts by
the share of real time its audio arrives at over the last 5 s (a new one counts 1), so streams
that hold a place without sending audio (trickling, paused) do not lock out streams that would.
A new stream is admitted only if, with ``n + 1`` streams, ``rho < 1``, the expected batch
``(n+1)*T/P`` fits in ``--max-batch``, two steps (``T`` and ``T_recent``) fit in 80 % of
``P`` (a stream's next chunk can only join a step that starts after the step serving its
last chunk has ended, so a stream that fell behind catches up only if two steps fit in a
period; past that, everyone falls behind for good, whatever the budget), the largest of
the three latencies is at most
80 % of the budget (the rest is left for what the model leaves out: the event loop,
serialisation, jitter), and the scheduler's backlog is below one full batch (fewer than ``--max-batch`` streams with
chunks waiting: more means the engine is already behind).

``c0`` and ``c`` come from timing engine steps of two batch sizes at start-up
(``calibrate``, each the fastest of several steps: a busy neighbour during start-up only ever
adds time, and must not make the server refuse streams for as long as it runs); afterwards
every step's measured time is compared with ``s(B)`` and the median ratio of the last 32
steps of the last 10 s scales both (a machine that slows down, beam search, another process on
the cores: admission tightens within a second, and relaxes again once the steps are fast or,
on an idle server, after 10 s). Transport-free and
torch-free: tested with hand-fed step times.
"""

from __future__ import annotations

import collections
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from server.errors import ASRError, ErrorCode
from server.types import LimitReason

CHUNK_PERIOD_S = 0.16  # one stream's chunk every 160 ms at real-time pace
RECENT_STEPS = 32  # steps whose median time / predicted time scales the calibrated cost
SCALE_WINDOW_S = 10.0  # ... if they ran within this long: an idle server forgets a past stall
RECENT_WINDOW_S = 2.0  # steps older than this say nothing about the load now
HEADROOM = 0.8  # the predicted worst chunk latency may use this share of the budget


@dataclass(frozen=True)
class StepCost:
    """Cost of one engine step of ``B`` streams: ``c0 + c * B`` seconds."""

    c0: float
    c: float

    def __call__(self, batch: float) -> float:
        return self.c0 + self.c * batch

    def scaled(self, factor: float) -> "StepCost":
        return StepCost(self.c0 * factor, self.c * factor)

    @classmethod
    def fit(cls, samples: Sequence[tuple[int, float]]) -> "StepCost":
        """Least-squares line through (batch size, seconds) samples, with ``c0 >= 0`` and
        ``c`` at least 2 % of a one-stream step (noise never makes a stream free)."""
        if not samples:
            raise ValueError("no step times to fit")
        xs = [float(b) for b, _ in samples]
        ys = [float(s) for _, s in samples]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        c = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
        c0 = my - c * mx
        if c0 < 0:  # a line through the origin
            c0, c = 0.0, sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
        c = max(c, 0.02 * (c0 + c))
        return cls(c0, c)


@dataclass(frozen=True)
class Prediction:
    """What ``streams`` real-time streams would do to the engine."""

    streams: int
    utilisation: float  # rho = streams * c / P
    step_s: float  # steady-state step time T (inf when rho >= 1)
    batch: float  # expected streams per step
    latency_s: float  # predicted worst chunk latency: max(2T, 2*c0 + c*n, 2*(T_recent + c))


@dataclass(frozen=True)
class Refusal:
    reason: LimitReason
    error: ASRError


class Admission:
    """Decides whether a new stream may start; fed the engine's step times (``step_done``)."""

    def __init__(self, *, max_streams: int, latency_budget_s: float, max_batch: int,
                 chunk_period_s: float = CHUNK_PERIOD_S, clock: Callable[[], float] = time.monotonic,
                 max_streams_per_client: int = 0):
        self.max_streams = max_streams
        self.max_streams_per_client = max_streams_per_client
        self.latency_budget_s = latency_budget_s
        self.max_batch = max_batch
        self.chunk_period_s = chunk_period_s
        self.clock = clock
        self.calibrated: StepCost | None = None
        self._ratios: collections.deque[tuple[float, float]] = collections.deque(maxlen=RECENT_STEPS)  # (time, ratio)
        self._steps: collections.deque[tuple[float, float]] = collections.deque(maxlen=RECENT_STEPS)

    # --- the engine's measured cost --------------------------------------------------------
    def calibrate(self, measure: Callable[[int], float]) -> StepCost:
        """Fit ``c0 + c*B`` to the step times of one stream and of ``min(8, max_batch)`` streams,
        as ``measure(batch_size) -> seconds`` reports them (a typical step, e.g. a median)."""
        sizes = sorted({1, min(8, self.max_batch)})
        samples = [(b, measure(b)) for b in sizes]
        if len(samples) == 1:  # --max-batch 1: no slope to measure; charge it all per stream
            samples.append((2, 2 * samples[0][1]))
        self.calibrated = StepCost.fit(samples)
        return self.calibrated

    def step_done(self, batch_size: int, seconds: float, streams: int | None = None) -> None:
        """An engine step of ``batch_size`` chunks of ``streams`` streams (default: one chunk each)
        took ``seconds`` (called after every step)."""
        if batch_size <= 0 or seconds <= 0:
            return
        one_chunk_each = seconds
        if self.calibrated is not None:
            self._ratios.append((self.clock(), seconds / self.calibrated(batch_size)))
            if streams and streams < batch_size:
                one_chunk_each = seconds * self.calibrated(streams) / self.calibrated(batch_size)
        self._steps.append((self.clock(), one_chunk_each))

    @property
    def scale(self) -> float:
        """Median of measured / calibrated step time over the recent steps (1 without any)."""
        since = self.clock() - SCALE_WINDOW_S
        recent = [ratio for t, ratio in self._ratios if t >= since]
        return statistics.median(recent) if recent else 1.0

    def cost(self) -> StepCost | None:
        """The step cost now: the calibrated line scaled by ``scale``; None before calibration."""
        return self.calibrated.scaled(self.scale) if self.calibrated is not None else None

    def recent_step_s(self) -> float:
        """Median duration of the engine steps of the last ``RECENT_WINDOW_S`` (0 if none)."""
        since = self.clock() - RECENT_WINDOW_S
        recent = [s for t, s in self._steps if t >= since]
        return statistics.median(recent) if recent else 0.0

    def predict(self, streams: int) -> Prediction:
        """The load model (module docstring) for ``streams`` real-time streams."""
        cost = self.cost()
        if cost is None:
            return Prediction(streams, 0.0, 0.0, 0.0, 0.0)
        rho = streams * cost.c / self.chunk_period_s
        if rho >= 1:
            return Prediction(streams, rho, math.inf, math.inf, math.inf)
        step = cost.c0 / (1 - rho)
        latency = max(2 * step, 2 * cost.c0 + cost.c * streams, 2 * (self.recent_step_s() + cost.c))
        return Prediction(streams, rho, step, streams * step / self.chunk_period_s, latency)

    def fair_batch(self) -> int:
        """Most chunks a step may hold when chunks ahead of real time fill it up (the scheduler's
        fairness): a step of this size still lets two steps fit in ``HEADROOM`` of the chunk
        period, so the real-time streams keep up; at least 1, at most ``max_batch``."""
        cost = self.cost()
        if cost is None or cost.c <= 0:
            return self.max_batch
        return max(1, min(self.max_batch, int((HEADROOM * self.chunk_period_s / 2 - cost.c0) / cost.c)))

    def capacity(self, limit: int = 4096) -> int:
        """Streams load shedding would admit at the current cost with an idle scheduler (for logs
        and sizing; ``limit`` when shedding is off)."""
        if self.latency_budget_s <= 0 or self.calibrated is None:
            return limit
        n = 1
        while n < limit and self._overload(n + 1, 0) is None:
            n += 1
        return n

    # --- the decision ----------------------------------------------------------------------
    def check(self, active: int, *, draining: bool = False, queue_depth: int = 0, load: float | None = None,
              client_streams: int = 0) -> Refusal | None:
        """None when a new stream may start beside ``active`` ones, else why not; ``queue_depth``:
        the streams with chunks waiting for the engine; ``load``: what the ``active`` streams bring,
        in real-time streams (``server.core.pace``; default ``active``); ``client_streams``: the streams
        the new stream's client holds."""
        if draining:
            return Refusal(LimitReason.DRAINING, ASRError(
                ErrorCode.UNAVAILABLE, "the server is shutting down and accepts no new streams; "
                "retry on another instance"))
        if self.max_streams and active >= self.max_streams:
            return Refusal(LimitReason.MAX_STREAMS, ASRError(
                ErrorCode.RESOURCE_EXHAUSTED, f"the server is at its limit of {self.max_streams} "
                f"concurrent streams (--max-streams); retry later"))
        if self.max_streams_per_client and client_streams >= self.max_streams_per_client:
            return Refusal(LimitReason.CLIENT_STREAMS, ASRError(
                ErrorCode.RESOURCE_EXHAUSTED, f"this client already has {client_streams} streams open, "
                f"the limit per client (--max-streams-per-client); end one first"))
        if self.latency_budget_s <= 0 or self.calibrated is None or active == 0:
            return None  # an idle server admits one stream whatever it predicts: refusing it serves nobody
        load = active if load is None else load
        why = self._overload(math.ceil(load - 1e-9) + 1, queue_depth)
        if why is None:
            return None
        return Refusal(LimitReason.OVERLOAD, ASRError(
            ErrorCode.RESOURCE_EXHAUSTED, f"the server is overloaded: {why}; it refuses new streams "
            f"so that the {active} streams it serves keep their chunk latency under "
            f"{self.latency_budget_s * 1000:g} ms (--latency-budget-ms); retry later or elsewhere"))

    def _overload(self, streams: int, queue_depth: int) -> str | None:
        cost = self.cost()
        p = self.predict(streams)
        budget_ms = self.latency_budget_s * 1000
        measured = (f"engine steps cost {cost.c0 * 1000:.1f} ms + {cost.c * 1000:.2f} ms per stream "
                    f"(measured)")
        if p.utilisation >= 1:
            return (f"{streams} streams would need {p.utilisation * 100:.0f} % of the engine's time "
                    f"({measured})")
        if p.batch > self.max_batch:
            return (f"{streams} streams would need batches of {p.batch:.0f}, over --max-batch "
                    f"{self.max_batch} ({measured})")
        step = max(p.step_s, self.recent_step_s())
        if 2 * step > HEADROOM * self.chunk_period_s:
            return (f"engine steps of {step * 1000:.0f} ms with {streams} streams would leave too little "
                    f"of the {self.chunk_period_s * 1000:g} ms chunk period for two steps, so a stream that "
                    f"falls behind could not catch up ({measured})")
        if p.latency_s > HEADROOM * self.latency_budget_s:
            return (f"with {streams} streams the predicted worst chunk latency is {p.latency_s * 1000:.0f} ms, "
                    f"over {HEADROOM:.0%} of the {budget_ms:g} ms budget ({measured}, recent steps "
                    f"{self.recent_step_s() * 1000:.0f} ms)")
        if queue_depth >= self.max_batch:
            return (f"{queue_depth} streams have chunks waiting for the engine, a full batch or more "
                    f"(--max-batch {self.max_batch}): it is behind")
        return None
