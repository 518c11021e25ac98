"""Log lines a client can cause, at a bounded rate: a flood of refused calls or bad requests
writes one line per key and interval, with the count of the lines held back since."""

from __future__ import annotations

import logging
import time
from typing import Callable

DEFAULT_INTERVAL_S = 10.0


class ThrottledLog:
    """``log(key, message, *args)`` logs at most once per ``interval_s`` per ``key``; the next
    line logged for a key says how many were held back ("(and 41 more like it)")."""

    def __init__(self, logger: logging.Logger, level: int = logging.INFO, interval_s: float = DEFAULT_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 1024):
        self.logger = logger
        self.level = level
        self.interval_s = interval_s
        self.clock = clock
        self.max_keys = max_keys
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def __call__(self, key: str, message: str, *args) -> bool:
        """Log ``message % args`` unless ``key`` was logged within the interval; returns whether it was."""
        if not self.logger.isEnabledFor(self.level):
            return False
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        if len(self._last) >= self.max_keys:  # keys are few (methods, reasons); never grow without bound
            self._last.clear()
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            message += f" (and {held} more like it in the last %.0f s)"
            args = (*args, now - last)
        self.logger.log(self.level, message, *args)
        return True
