"""How fast a stream's audio arrives: when it counts as idle, and how much of the engine it uses.

A stream holds a slot (memory, an admission share, a ``--max-streams`` place) for as long as it
is open, so it must pay for it with audio. ``AudioPace`` keeps, per stream:

- an **idle deadline** on a credit of waiting time: the stream starts with
  ``idle_timeout_s``; time spends it; each second of audio received buys ``1 / min_rate``
  seconds, never above ``idle_timeout_s``. A real-time stream (pace 1) stays at the cap; one that
  stops sending ends ``idle_timeout_s`` after its audio stopped; one that trickles audio slower
  than ``min_rate`` of real time (a byte every few seconds) runs out as surely as a silent one.
  ``min_rate`` 0: any audio fills the credit (a pure idle timer).
- its **load**: audio seconds received over the last ``RATE_WINDOW_S`` (or since it opened, if
  younger) per second, capped at 1; a stream younger than ``START_GRACE_S`` counts as a full
  real-time stream (it is about to send), so hundreds of streams opened at once that then send
  nothing stop counting half a second later.
  Admission adds these up instead of counting streams, so streams that hold a slot without
  sending audio do not make the server refuse streams that would.

Transport-free; times are ``time.monotonic()`` seconds.
"""

from __future__ import annotations

import collections

RATE_WINDOW_S = 5.0  # audio arrivals the load is measured over
START_GRACE_S = 0.5  # a stream this young counts as a full real-time stream, audio or not


class AudioPace:
    def __init__(self, opened_at: float, idle_timeout_s: float, min_rate: float):
        self.opened_at = opened_at
        self.idle_timeout_s = idle_timeout_s
        self.min_rate = min_rate
        self._credit_s = idle_timeout_s  # waiting time left at ``_credit_at``
        self._credit_at = opened_at
        self._arrivals: collections.deque[tuple[float, float]] = collections.deque()  # (time, seconds)
        self._recent_s = 0.0  # sum of the seconds in ``_arrivals``

    def audio(self, now: float, seconds: float) -> None:
        """``seconds`` of audio arrived at ``now`` (zero-length messages buy nothing)."""
        if seconds <= 0:
            return
        left = self._credit_s - (now - self._credit_at)
        bought = self.idle_timeout_s if self.min_rate <= 0 else seconds / self.min_rate
        self._credit_s = min(self.idle_timeout_s, max(0.0, left) + bought)
        self._credit_at = now
        self._arrivals.append((now, seconds))
        self._recent_s += seconds
        self._forget(now)

    def refill(self, now: float) -> None:
        """The server held the client back (backpressure) until ``now``: it was not idle."""
        self._credit_s, self._credit_at = self.idle_timeout_s, now

    @property
    def idle_deadline(self) -> float:
        """When the stream counts as idle unless more audio comes."""
        return self._credit_at + self._credit_s

    def load(self, now: float) -> float:
        """Share of a real-time stream's audio this stream brings, in [0, 1]."""
        age = now - self.opened_at
        if age < START_GRACE_S:
            return 1.0
        self._forget(now)
        return min(1.0, self._recent_s / min(RATE_WINDOW_S, age))

    def _forget(self, now: float) -> None:
        while self._arrivals and self._arrivals[0][0] < now - RATE_WINDOW_S:
            self._recent_s -= self._arrivals.popleft()[1]
        if not self._arrivals:
            self._recent_s = 0.0
