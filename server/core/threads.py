"""Intra-op threads that survive a noisy neighbour.

With ``N > 1`` intra-op threads every parallel operator of a step waits for its slowest
thread. A process busy on one of the cores makes that thread late at every operator: measured
on 2 cores with one busy-looping process beside it, a step of 8 streams of the full model took
6x its quiet time on 2 threads and 2x on 1 thread. On a quiet machine 2 threads are 1.8x
faster. Neither count is right all the time, so with ``--threads 0`` (the default) the
``ThreadGovernor`` chooses between ``N`` (one per core) and 1 from the steps themselves:

- it watches each step's *slowdown*: measured time / the calibrated cost of its batch size
  (admission's, measured at ``N`` threads on start-up on silence: speech costs more, so a quiet
  server's slowdown is not 1 but whatever its traffic makes it);
- on ``N`` threads it keeps the median slowdown of each window of ``WINDOW`` steps; when a
  window's median exceeds ``SLOW`` times the lowest of the last ``BASELINE_WINDOWS`` (what this
  traffic costs on a quiet machine) and ``SLOW`` itself, it switches to 1 thread;
- on 1 thread it probes ``N`` threads again every ``PROBE_EVERY_S`` for ``WINDOW`` steps and
  keeps whichever count had the lower median slowdown.

The thread count never changes a result (tests/test_batching_invariance.py checks transcripts
across a switch); it only changes how long a step takes. Transport- and torch-free: ``apply``
does the switch (on the inference thread).
"""

from __future__ import annotations

import collections
import logging
import statistics
import time
from typing import Callable

log = logging.getLogger(__name__)

WINDOW = 16  # steps whose median slowdown judges a thread count
SLOW = 2.0  # median slowdown on N threads that makes the governor try 1 thread
PROBE_EVERY_S = 10.0  # on 1 thread, how often N threads are tried again
BASELINE_WINDOWS = 8  # windows on N threads whose lowest median is the quiet machine's slowdown


class ThreadGovernor:
    def __init__(self, full: int, apply: Callable[[int], None], clock: Callable[[], float] = time.monotonic):
        if full < 2:
            raise ValueError("a governor needs more than one thread to choose from")
        self.full = full
        self.apply = apply
        self.clock = clock
        self.threads = full
        self.switches = 0
        self._slowdowns: collections.deque[float] = collections.deque(maxlen=WINDOW)
        self._one_thread_median = 0.0  # median slowdown of the last window on 1 thread
        self._probing = False  # on N threads to compare with 1
        self._next_probe = 0.0
        self._full_medians: collections.deque[float] = collections.deque(maxlen=BASELINE_WINDOWS)

    def step_done(self, slowdown: float) -> None:
        """A step took ``slowdown`` times its calibrated cost (call after every step)."""
        self._slowdowns.append(slowdown)
        if len(self._slowdowns) < WINDOW:
            return
        median = statistics.median(self._slowdowns)
        if self.threads == self.full:
            if self._probing:  # the probe is over: keep N only if it beat 1 thread
                self._probing = False
                if median >= self._one_thread_median:
                    self._set(1, f"{self.full} threads were {median:.1f}x slower than calibrated, 1 thread "
                                 f"{self._one_thread_median:.1f}x: staying on 1 thread")
                    return
                log.info("intra-op threads: back to %d (%.1fx the calibrated step time, 1 thread %.1fx)",
                         self.full, median, self._one_thread_median)
                self._full_medians.append(median)
                self._slowdowns.clear()
            else:
                baseline = min(self._full_medians, default=1.0)
                self._full_medians.append(median)
                if median > SLOW * baseline and median > SLOW:
                    self._set(1, f"steps take {median:.1f}x their calibrated time on {self.full} threads, "
                                 f"{median / baseline:.1f}x the recent best (another process on the cores?): "
                                 f"trying 1 thread")
                else:
                    self._slowdowns.clear()
        elif self.clock() >= self._next_probe:  # on 1 thread: time to try N again
            self._one_thread_median = median
            self._probing = True
            self._set(self.full, None)

    def _set(self, threads: int, reason: str | None) -> None:
        if reason:
            log.warning("intra-op threads: %s", reason)
        self.threads = threads
        self.switches += 1
        self._slowdowns.clear()
        if threads == 1:
            self._next_probe = self.clock() + PROBE_EVERY_S
        self.apply(threads)
