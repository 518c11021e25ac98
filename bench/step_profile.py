"""Cost of one batched engine step, by batch size and by stage; operator shares.

``fit_step_cost`` times ``Engine.run_batch`` on B streams (B = 1, 2, 4, ...) that
are past their left-context warm-up, and fits ``step = c0 + c * B`` (least
squares on the medians): ``c0`` is the fixed cost of a step (weights read,
Python and per-layer overhead), ``c`` the marginal cost of one more stream.
``operator_profile`` reports, from ``torch.profiler``, the share of a step spent
in matrix products versus everything else, and the share spent gathering and
scattering the streams' left-context state (``index_select`` / ``index_put_``).

Capacity model (design brief): with streams at random phases a chunk waits up to
one step and rides the next, so p99 chunk latency is about two step times; the
largest N with ``2 * (c0 + c * N) <= 160 ms`` is a first estimate of capacity,
which the capacity search then refines against the real server.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from server.model.engine import ChunkWork, Engine
from server.types import WINDOW_SAMPLES, DecodingMethod

MATMUL_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul", "aten::_weight_int8pack_mm",
              "aten::_scaled_dot_product", "quantized::linear_dynamic", "aten::_int_mm", "onednn::",
              "mkldnn", "aten::_linear", "torchao::", "aten::baddbmm", "aten::lstm", "asr_native::rowwise_int8",
              "asr_native::linear_f32", "asr_avx512::", "asr_avx2::", "asr_portable::")

STATE_IO_OPS = ("aten::index_select", "aten::index_put_", "aten::_index_put_impl_")


@dataclass
class StepCost:
    batch_sizes: list[int]
    total_ms: list[float]
    encoder_ms: list[float]
    decoder_ms: list[float]
    features_ms: list[float]
    c0_ms: float
    c_ms: float

    @property
    def estimated_capacity(self) -> int:
        """Largest N with 2 * (c0 + c N) <= 160 ms (at least 1)."""
        return max(1, int((80.0 - self.c0_ms) / self.c_ms)) if self.c_ms > 0 else 1

    def as_dict(self) -> dict:
        return {"batch_sizes": self.batch_sizes, "total_ms": self.total_ms, "encoder_ms": self.encoder_ms,
                "decoder_ms": self.decoder_ms, "features_ms": self.features_ms,
                "c0_ms": round(self.c0_ms, 2), "c_ms": round(self.c_ms, 2),
                "estimated_capacity": self.estimated_capacity}


def _streams(engine: Engine, n: int, method: DecodingMethod, beam: int, warm_chunks: int = 10):
    """``n`` streams that have already run ``warm_chunks`` chunks (left context full)."""
    streams = [engine.new_stream(method, beam) for _ in range(n)]
    rng = np.random.default_rng(0)
    for _ in range(warm_chunks):
        engine.run_batch([ChunkWork(s, (rng.standard_normal(WINDOW_SAMPLES) * 0.05).astype(np.float32))
                          for s in streams])
    return streams


def _speechlike(windows: list[np.ndarray], k: int) -> np.ndarray:
    return windows[k % len(windows)]


def fit_step_cost(engine: Engine, batch_sizes=(1, 2, 4, 8, 16, 32), repeats: int = 5,
                  method: DecodingMethod = DecodingMethod.GREEDY, beam: int = 1,
                  windows: list[np.ndarray] | None = None) -> StepCost:
    """Median step times per batch size and the ``c0 + c * B`` fit (milliseconds)."""
    windows = windows or [np.zeros(WINDOW_SAMPLES, np.float32)]
    rows = []
    for b in batch_sizes:
        streams = _streams(engine, b, method, beam)
        times = []
        for r in range(repeats):
            works = [ChunkWork(s, _speechlike(windows, i + r * b)) for i, s in enumerate(streams)]
            stats = engine.run_batch(works)[0].step_stats
            times.append((stats.total, stats.encoder, stats.decoder, stats.features))
        for s in streams:
            engine.release(s)
        rows.append(np.median(np.array(times), axis=0) * 1000)
    rows = np.array(rows)
    slope, intercept = np.polyfit(np.array(batch_sizes, dtype=float), rows[:, 0], 1)
    return StepCost(list(batch_sizes), *[[round(float(v), 2) for v in rows[:, j]] for j in range(4)],
                    c0_ms=float(intercept), c_ms=float(slope))


def operator_profile(engine: Engine, batch: int = 16, steps: int = 3, top: int = 12) -> dict:
    """Share of a batched step's CPU time in matrix products vs the rest, and the top operators."""
    streams = _streams(engine, batch, DecodingMethod.GREEDY, 1, warm_chunks=9)
    window = np.zeros(WINDOW_SAMPLES, np.float32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.run_batch([ChunkWork(s, window) for s in streams])
        wall = time.perf_counter() - t0
    for s in streams:
        engine.release(s)
    events = prof.key_averages()
    # self CPU time: each microsecond counted once, in the operator that spent it
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if any(k in e.key for k in MATMUL_OPS))
    state_io = sum(e.self_cpu_time_total for e in events if e.key in STATE_IO_OPS)
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"batch": batch, "step_ms": round(wall / steps * 1000, 2),
            "matmul_share": round(matmul / total, 3) if total else None,
            "state_gather_scatter_share": round(state_io / total, 3) if total else None,
            "top_operators": [{"op": e.key, "share": round(e.self_cpu_time_total / total, 3),
                               "calls_per_step": e.count // steps} for e in ranked]}
