"""Python's cyclic garbage collector on the latency path: keep its pauses short, and time them.

A full (generation 2) collection walks every tracked object in the process. After
start-up that is the whole of torch, gRPC and the model's modules, several hundred
thousand objects: on the reference machine one full collection took 60-140 ms while
holding the GIL, which stops the inference thread and the event loop alike, so every
stream's chunk in flight waited that long (a p99 chunk latency of 217 ms against a
p50 of 58 ms at 24 int8 streams; see BENCHMARKS.md, "GC pauses").

``freeze_startup_heap`` moves what start-up created to the permanent generation
(``gc.freeze``): later collections only walk the objects created since (sessions,
requests, results), and reference counting still frees everything as before; only
reference cycles among the frozen objects are never collected, which is what a
server's start-up state (modules, the model, the servicers) is for its lifetime.

``GcPauseTimer`` reports every collection's duration to a callback (the metrics'
``asr_gc_pause_seconds`` histogram).
"""

from __future__ import annotations

import gc
import time
from typing import Callable


def freeze_startup_heap() -> int:
    """Collect what start-up left behind, then exempt every live object from later
    collections; returns how many objects are now frozen. Call once, when the server
    is loaded and warm, in a process the server owns (``asr-server``, the load tester)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class GcPauseTimer:
    """Calls ``observe(generation, seconds)`` after each garbage collection in the process
    (from whichever thread ran it), while installed (``install`` / ``close``)."""

    def __init__(self, observe: Callable[[int, float], None]):
        self._observe = observe
        self._started: float | None = None

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self._observe(info["generation"], time.perf_counter() - self._started)
            self._started = None

    def install(self) -> "GcPauseTimer":
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def close(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)
