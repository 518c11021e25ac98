"""Admission control: the load model with hand-fed step times, then real servers under overload.

The overload tests: three times the stream limit at once (the excess refused
within 100 ms, the admitted streams unchanged and within their latency budget), and load
shedding on an engine made slow on purpose (c0 + c*B of sleep per step): new streams are
refused once the measured cost predicts the budget would be missed, and the admitted ones keep it.
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from client.stream import RIGHT_CONTEXT_S, StreamOptions, pcm16, stream_audio
from server.core.admission import CHUNK_PERIOD_S, SCALE_WINDOW_S, Admission, StepCost
from server.errors import ErrorCode
from server.model.engine import Engine
from server.types import LimitReason
from tests.conftest import running_server
from tests.helpers import transcript
from tests.observability import scrape
from tests.test_bad_input import wait_sessions_freed


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def admission(max_streams=0, budget_ms=160.0, max_batch=32, c0=0.028, c=0.0063, clock=None) -> Admission:
    a = Admission(max_streams=max_streams, latency_budget_s=budget_ms / 1000, max_batch=max_batch,
                  clock=clock or Clock())
    a.calibrate(lambda b: c0 + c * b)
    return a


# --- the model -------------------------------------------------------------------------------
def test_step_cost_fit_recovers_a_line_and_stays_physical():
    cost = StepCost.fit([(1, 0.030), (8, 0.072), (4, 0.048)])
    assert cost.c0 == pytest.approx(0.024, abs=1e-9) and cost.c == pytest.approx(0.006, abs=1e-9)
    flat = StepCost.fit([(1, 0.05), (8, 0.04)])  # noise: bigger batch measured faster
    assert flat.c > 0 and flat.c0 >= 0
    assert StepCost.fit([(1, 0.01), (8, 0.10)]).c0 == 0.0  # would be negative: through the origin


def test_calibration_times_one_stream_and_a_batch():
    sizes = []
    a = Admission(max_streams=0, latency_budget_s=0.16, max_batch=32)
    cost = a.calibrate(lambda b: sizes.append(b) or 0.01 + 0.002 * b)
    assert sizes == [1, 8]
    assert cost.c0 == pytest.approx(0.01) and cost.c == pytest.approx(0.002)


def test_prediction_follows_the_continuous_batching_model():
    a = admission()
    p = a.predict(16)
    rho = 16 * 0.0063 / CHUNK_PERIOD_S
    assert p.utilisation == pytest.approx(rho)
    assert p.step_s == pytest.approx(0.028 / (1 - rho))
    assert p.batch == pytest.approx(16 * p.step_s / CHUNK_PERIOD_S)
    # phases in two groups: two steps hold all 16 chunks; this bound is the larger while T < P/2
    assert p.latency_s == pytest.approx(2 * 0.028 + 0.0063 * 16) and p.step_s < CHUNK_PERIOD_S / 2
    slow = admission(c0=0.07, c=0.002).predict(16)  # T > P/2: random phases are the worse case
    assert slow.latency_s == pytest.approx(2 * slow.step_s) and slow.latency_s > 2 * 0.07 + 0.002 * 16
    assert math.isinf(a.predict(26).latency_s)  # 26 * 6.3 ms > 160 ms: more work than time


def test_capacity_of_the_design_briefs_measured_engine():
    """c0 28 ms, c 6.3 ms per stream (the brief's fp32 encoder): 2*c0 + c*n <= 0.8 * 160 ms
    admits 11 streams."""
    a = admission()
    admitted = 0
    while a.check(admitted) is None:
        admitted += 1
    assert admitted == 11 == a.capacity()
    assert a.predict(11).latency_s <= 0.128 < a.predict(12).latency_s
    refusal = a.check(11)
    assert refusal.reason is LimitReason.OVERLOAD and refusal.error.code is ErrorCode.RESOURCE_EXHAUSTED
    assert "predicted worst chunk latency" in refusal.error.message and "160 ms" in refusal.error.message
    assert "28.0 ms + 6.30 ms per stream" in refusal.error.message


def test_measured_steps_rescale_the_cost():
    clock = Clock()
    a = admission(clock=clock)
    assert a.check(10) is None
    for _ in range(40):  # the machine became twice as slow
        a.step_done(4, 2 * (0.028 + 0.0063 * 4))
        clock.now += 0.05
    assert a.scale == pytest.approx(2.0)
    assert a.check(10) is not None  # 2T at twice the cost, with 11 streams, is over budget now
    one_stall = admission(clock=clock)
    one_stall.step_done(4, 5.0)  # a single stalled step moves the median of one
    for _ in range(10):
        one_stall.step_done(4, 0.028 + 0.0063 * 4)
    assert one_stall.scale == pytest.approx(1.0)


def test_recent_step_times_count_and_then_expire():
    """Steps longer than the model's steady state (streams sent faster than real time fill every
    batch) refuse new streams; two seconds after the engine went quiet they no longer count."""
    clock = Clock()
    a = admission(c0=0.005, c=0.001, budget_ms=60, clock=clock)
    assert a.check(2) is None  # the model alone: ~13 ms for 3 streams
    for _ in range(32):
        a.step_done(30, 0.035)  # exactly what the calibrated line says for 30 streams
    assert a.scale == pytest.approx(1.0)
    refusal = a.check(2)  # 2 * (35 + 1) ms > 0.8 * 60 ms
    assert refusal is not None and "recent steps 35 ms" in refusal.error.message
    clock.now += 2.5
    assert a.check(2) is None


def test_steps_over_half_a_chunk_period_refuse_whatever_the_budget():
    """A stream's next chunk joins a step that starts after the one serving its last chunk: unless
    two steps fit in a chunk period (with the same 20 % headroom), a stream that fell behind never
    catches up, so a large budget does not admit more."""
    clock = Clock()
    a = admission(c0=0.045, c=0.005, budget_ms=1000, clock=clock)
    assert a.capacity() == 9  # T = 45 ms / (1 - 10 * 5 ms / 160 ms) = 65.5 ms > 64 ms for a 10th
    assert "could not catch up" in a.check(9).error.message
    for _ in range(32):
        a.step_done(2, 0.09)  # the engine is slower now than the model says
    assert a.check(1) is not None and a.check(1).reason is LimitReason.OVERLOAD


def test_backlog_over_a_full_batch_refuses():
    a = admission(c0=0.001, c=0.0001, max_batch=8)
    assert a.check(3, queue_depth=7) is None
    refusal = a.check(3, queue_depth=8)
    assert refusal.reason is LimitReason.OVERLOAD and "behind" in refusal.error.message


def test_batches_over_max_batch_refuse():
    a = admission(c0=0.05, c=0.0005, max_batch=4)
    refusal = a.check(12)  # T ~ 52 ms: 13 streams would need batches of ~4.3
    assert refusal is not None and "--max-batch" in refusal.error.message


def test_order_of_refusals_and_no_shedding_when_off():
    a = admission(max_streams=4, budget_ms=0)
    assert a.check(3) is None
    assert a.check(4).reason is LimitReason.MAX_STREAMS
    assert a.check(4).error.code is ErrorCode.RESOURCE_EXHAUSTED
    assert a.check(0, draining=True).reason is LimitReason.DRAINING
    assert a.check(0, draining=True).error.code is ErrorCode.UNAVAILABLE
    assert a.check(10_000, queue_depth=10_000).reason is LimitReason.MAX_STREAMS
    assert admission(budget_ms=0).check(10_000, queue_depth=10_000) is None
    assert Admission(max_streams=0, latency_budget_s=0.16, max_batch=32).check(10_000) is None  # not calibrated
    hopeless = admission(c0=1.0)  # even one stream would miss the budget ...
    assert hopeless.check(0) is None  # ... but an idle server serves one rather than nobody
    assert hopeless.check(1).reason is LimitReason.OVERLOAD


# --- real servers ------------------------------------------------------------------------------
async def paced_stream(stub, audio: np.ndarray):
    """One real-time stream with interim results: (final transcript, server chunk latencies in s).
    The latencies are those of the chunks the stream's own pace delivered; the last windows,
    which the half-close completes with zero padding, are end-of-stream latency (a metric of
    its own) and left out."""
    options = StreamOptions(realtime=True, interim_results=True, endpointing=False)
    duration = len(audio) / 16000
    finals, latencies = [], []
    async for event in stream_audio(stub, pcm16(audio), 16000, options):
        for result in event.response.results:
            end = result.result_end_time.seconds + result.result_end_time.nanos / 1e9
            if end + RIGHT_CONTEXT_S <= duration + 1e-6:
                latencies.append(result.timing.chunk_latency_ms / 1000)
            if result.is_final:
                finals.append(result.alternatives[0].transcript)
    return " ".join(t for t in finals if t), latencies


def p99(values: list[float]) -> float:
    return float(np.percentile(values, 99))


async def attempt(stub, audio: np.ndarray, go: asyncio.Event, delay: float = 0.0):
    """A paced stream that may be refused: ("served", transcript, latencies) or
    ("refused", code, details, seconds from the call to the refusal)."""
    await go.wait()
    await asyncio.sleep(delay)
    start = time.monotonic()
    try:
        text, latencies = await paced_stream(stub, audio)
    except grpc.aio.AioRpcError as exc:
        return "refused", exc.code(), exc.details(), time.monotonic() - start
    return "served", text, latencies


def check_refusals(refused: list, words: str) -> None:
    for _, code, details, seconds in refused:
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert words in details
        assert seconds < 0.100, f"refused after {seconds * 1000:.0f} ms"


async def test_three_times_the_stream_limit_at_once(speech):
    limit = 4
    clips = [audio[:int(2.5 * 16000)] for _, audio, _ in speech[:limit]]
    async with running_server(max_streams=limit) as (server, stub):
        references = [await transcript(stub, clip) for clip in clips]
        # (the channel is connected: the references above used it)
        go = asyncio.Event()
        tasks = [asyncio.create_task(attempt(stub, clips[i % limit], go)) for i in range(3 * limit)]
        go.set()
        outcomes = await asyncio.gather(*tasks)
        await wait_sessions_freed(server)
        metrics = scrape(server.metrics_port)
    served = [(i % limit, o) for i, o in enumerate(outcomes) if o[0] == "served"]
    refused = [o for o in outcomes if o[0] == "refused"]
    assert len(served) == limit and len(refused) == 2 * limit
    check_refusals(refused, "--max-streams")
    latencies = []
    for clip, (_, text, lat) in served:
        assert text == references[clip]
        latencies += lat
    assert p99(latencies) <= 0.160, f"p99 chunk latency {p99(latencies) * 1000:.0f} ms"
    assert metrics.value("asr_limit_hits_total", reason="max_streams") == 2 * limit
    assert metrics.value("asr_streams_total", api="asr.v1", outcome="rejected") == 2 * limit


@pytest.mark.slow
async def test_load_shedding_on_a_slow_engine_keeps_the_admitted_streams_in_budget(speech, monkeypatch):
    """Every engine step also sleeps 30 ms + 8 ms per stream (plus the tiny model's own cost): the
    model admits about 8 streams (two steps T = c0 / (1 - rho) within 80 % of the chunk period).
    Thirty streams of 3 to 4.75 s arrive one every 40 ms: those beyond are refused at once with
    RESOURCE_EXHAUSTED saying why, and the admitted ones keep up, with their transcripts and p99
    chunk latency within the budget, 320 ms here, give or take the stalls this shared test
    machine adds to a step now and then, which no cost model predicts (on a noisy day: p99 of
    167-327 ms over ten runs, 5-8 streams admitted; without shedding, thirty streams on this
    engine queue for seconds)."""
    c0, c, budget_ms = 0.030, 0.008, 320
    real_run_batch = Engine.run_batch

    def slow_run_batch(engine, works):
        time.sleep(c0 + c * len(works))
        return real_run_batch(engine, works)

    monkeypatch.setattr(Engine, "run_batch", slow_run_batch)
    audio = speech[0][1]
    clips = [audio[:int(seconds * 16000)] for seconds in (3.0, 3.35, 3.7, 4.05, 4.4, 4.75)]
    async with running_server(max_streams=0, latency_budget_ms=budget_ms) as (server, stub):
        cost = server.service.sessions.admission.calibrated
        # the calibration's two step times (1 and 8 streams) include the injected sleeps (the
        # model's own cost splits between c0 and c as it likes: its decoder rounds are shared)
        assert cost(1) >= 0.99 * (c0 + c) and cost(8) >= 0.99 * (c0 + 8 * c), cost
        references = [await transcript(stub, clip) for clip in clips]
        go = asyncio.Event()
        order = np.random.default_rng(0).permutation(30) % len(clips)  # the ends are spread too
        tasks = [asyncio.create_task(attempt(stub, clips[k], go, 0.04 * i)) for i, k in enumerate(order)]
        go.set()
        outcomes = await asyncio.gather(*tasks)
        await wait_sessions_freed(server)
        metrics = scrape(server.metrics_port)
    served = [(k, o) for k, o in zip(order, outcomes) if o[0] == "served"]
    refused = [o for o in outcomes if o[0] == "refused"]
    assert 4 <= len(served) <= 14, (len(served), refused[:1][0][2] if refused else None)  # the model's "about 8", calibrated on a noisy machine
    check_refusals(refused, "--latency-budget-ms")
    assert all("overloaded" in details for _, _, details, _ in refused)
    assert all(text == references[k] for k, (_, text, _) in served)
    latencies = [x for _, (_, _, lat) in served for x in lat]
    stalls = 1.25  # the machine's, beyond what a step cost model predicts (see above)
    assert p99(latencies) <= stalls * budget_ms / 1000, f"p99 chunk latency {p99(latencies) * 1000:.0f} ms"
    assert metrics.value("asr_limit_hits_total", reason="overload") == len(refused)


def test_a_stall_is_forgotten_by_an_idle_server():
    """Steps slowed by another process raise the cost; once the server has run no step for
    SCALE_WINDOW_S, it prices streams at the calibrated cost again instead of refusing them."""
    clock = Clock()
    a = admission(clock=clock)
    for _ in range(32):
        a.step_done(4, 20 * (0.028 + 0.0063 * 4))  # a busy neighbour: steps 20x slower
        clock.now += 0.05
    assert a.scale == pytest.approx(20.0) and a.check(2) is not None
    clock.now += SCALE_WINDOW_S + 0.1
    assert a.scale == 1.0 and a.check(2) is None


async def test_a_busy_neighbour_during_start_up_does_not_cripple_admission():
    """Calibrated while another process busy-loops on the cores, the server prices streams about
    as a quietly started one does (the fastest of its timed steps, not a typical one)."""
    async with running_server(latency_budget_ms=160) as (server, _):
        quiet = server.service.sessions.admission.calibrated
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        async with running_server(latency_budget_ms=160) as (server, _):
            busy = server.service.sessions.admission.calibrated
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    print(f"quiet start: {quiet}, busy start: {busy}")
    assert busy(8) < 2.5 * quiet(8), (quiet, busy)
