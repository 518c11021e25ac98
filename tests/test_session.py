"""``Session`` units: a fake scheduler answers its chunks, so each rule of its contract is checked
in milliseconds (lifecycle, input rules, lazy decoding under --max-buffered-seconds, the end of
input, limits, teardown); one test runs it on the small real engine and scheduler."""

import asyncio
import time
from dataclasses import dataclass

import numpy as np
import pytest

from server.config import ServerSettings
from server.core.scheduler import JobTiming, Scheduler
from server.core.session import DECODE_PIECE_SECONDS, Session, SessionState
from server.errors import ASRError, ErrorCode
from server.model.engine import ChunkResult, Engine, TokenAlternative
from server.model.vocabulary import CharTokenTable
from server.observability.observer import Observer
from server.types import SAMPLE_RATE, SEGMENT_SAMPLES, LimitReason, StepStats, StreamConfig
from tests.conftest import small_model

TOKEN_A = CharTokenTable.default().encode("a")[0]


@dataclass
class FakeStream:
    chunks_done: int = 0


class FakeEngine:
    """Hands out streams and counts their releases."""

    def __init__(self):
        self.tokens = CharTokenTable.default()
        self.released: list[FakeStream] = []

    def new_stream(self, method, beam_width, endpointing=None):
        return FakeStream()

    def release(self, stream):
        self.released.append(stream)


class FakeScheduler:
    """Queues chunks; with ``answer`` set, answers each on the loop's next turn with one token "a"
    per chunk the stream has done (so the transcript counts the chunks) and no endpoint."""

    def __init__(self, answer: bool = True):
        self.answer = answer
        self.futures: list[asyncio.Future] = []
        self.windows: list[np.ndarray] = []

    def enqueue(self, key, work, ready_at=None, due_at=0.0):
        future = asyncio.get_running_loop().create_future()
        self.futures.append(future)
        if self.answer:
            asyncio.get_running_loop().call_soon(self._run, future, work)
        return future, JobTiming(ready_at if ready_at is not None else time.monotonic())

    def _run(self, future, work):
        if future.done():
            return
        self.windows.append(work.window)
        work.stream.chunks_done += 1
        n = work.stream.chunks_done
        alternative = TokenAlternative((TOKEN_A,) * n, tuple(range(0, 4 * n, 4)), 1.0)
        future.set_result(ChunkResult([alternative], 1.0, 4 * n, StepStats()))

    def call_soon_on_engine_thread(self, fn, *args):
        fn(*args)


class RecordingObserver(Observer):
    def __init__(self):
        self.limits: list[LimitReason] = []

    def limit_hit(self, reason):
        self.limits.append(reason)


def session(answer: bool = True, observer: Observer | None = None, **settings) -> Session:
    return Session(FakeEngine(), FakeScheduler(answer), ServerSettings(model="random-small", **settings),
                   observer=observer)


def pcm(seconds: float, rate: int = SAMPLE_RATE, channels: int = 1) -> bytes:
    """A quiet tone as LINEAR16."""
    t = np.arange(round(seconds * rate)) / rate
    samples = (3000 * np.sin(2 * np.pi * 220 * t)).astype("<i2")
    return np.repeat(samples, channels).tobytes()


async def drain(s: Session) -> list:
    return [r async for r in s.results()]


async def test_lifecycle_open_active_draining_closed():
    s = session()
    assert s.state is SessionState.OPEN and not s.accepting_audio
    s.start(StreamConfig())
    assert s.state is SessionState.ACTIVE and s.accepting_audio
    s.feed(pcm(0.5))
    s.finish_input()
    assert s.state is SessionState.DRAINING and not s.accepting_audio
    results = await drain(s)
    assert s.completed and results[-1].is_final
    s.close()
    assert s.state is SessionState.CLOSED


async def test_audio_before_the_config_a_second_config_and_audio_after_the_end_are_refused():
    s = session()
    with pytest.raises(ASRError) as before:
        s.feed(pcm(0.1))
    assert before.value.code is ErrorCode.INVALID_ARGUMENT
    s.start(StreamConfig())
    with pytest.raises(ASRError) as twice:
        s.start(StreamConfig())
    assert twice.value.code is ErrorCode.INVALID_ARGUMENT
    s.finish_input()
    with pytest.raises(ASRError) as after:
        s.feed(pcm(0.1))
    assert after.value.code is ErrorCode.FAILED_PRECONDITION


async def test_a_partial_sample_is_refused_and_nothing_of_the_message_is_kept():
    s = session()
    s.start(StreamConfig(channels=2))
    with pytest.raises(ASRError) as info:
        s.feed(pcm(0.5, channels=2) + b"\x01\x02")  # half a stereo frame too many
    assert info.value.code is ErrorCode.INVALID_ARGUMENT and "whole samples" in info.value.message
    assert s.buffered_seconds == 0 and s.stats.first_audio_at is None
    s.feed(pcm(0.5, channels=2))
    s.finish_input()
    assert (await drain(s))[-1].end_s == pytest.approx(0.5)


async def test_a_large_message_is_decoded_a_second_at_a_time_under_max_buffered_seconds():
    limit = 2.0
    s = session(max_buffered_seconds=limit)
    s.start(StreamConfig(interim_results=True))
    s.feed(pcm(30.0))
    assert s.buffered_seconds <= limit + DECODE_PIECE_SECONDS  # not 30 s of decoded samples
    assert not s.has_room
    s.finish_input()
    seen = []
    async for _ in s.results():
        seen.append(s.buffered_seconds)
    padding = SEGMENT_SAMPLES / SAMPLE_RATE  # the zero-padded last window, once all is decoded
    assert len(seen) > 100 and max(seen) <= limit + DECODE_PIECE_SECONDS + padding
    assert s.has_room


async def test_finish_input_with_audio_pending_still_recognises_all_of_it():
    s = session(max_buffered_seconds=2.0)
    s.start(StreamConfig())
    s.feed(pcm(30.0))
    s.finish_input()  # most of the message is not decoded yet
    final = (await drain(s))[-1]
    assert final.is_final and final.end_s == pytest.approx(30.0)
    windows = -(-30 * SAMPLE_RATE // SEGMENT_SAMPLES)
    assert len(s.scheduler.windows) == windows and len(final.transcript) == windows


async def test_end_input_delivers_the_final_result_then_raises_its_status():
    s = session()
    s.start(StreamConfig())
    s.feed(pcm(1.0))
    draining = ASRError(ErrorCode.UNAVAILABLE, "the server is shutting down")
    assert s.end_input(draining) and s.ending.is_set()
    assert not s.end_input(ASRError(ErrorCode.DEADLINE_EXCEEDED, "idle"))  # the first status wins
    s.feed(pcm(1.0))  # ignored: the stream ends with the status, not with this audio's error
    results = []
    with pytest.raises(ASRError) as info:
        async for result in s.results():
            results.append(result)
    assert info.value is draining and s.end_status is draining
    assert results[-1].is_final and results[-1].end_s == pytest.approx(1.0)


async def test_end_input_before_the_config_ends_the_stream_at_once():
    s = session()
    status = ASRError(ErrorCode.DEADLINE_EXCEEDED, "no configuration in time")
    assert s.end_input(status)
    with pytest.raises(ASRError) as info:
        await drain(s)
    assert info.value is status


async def test_close_is_idempotent_withdraws_queued_chunks_and_frees_the_stream_once():
    s = session(answer=False)
    s.start(StreamConfig())
    s.feed(pcm(1.0))
    queued = list(s.scheduler.futures)
    assert queued
    s.close()
    s.close()
    assert s.state is SessionState.CLOSED
    assert all(f.cancelled() for f in queued)
    assert len(s.engine.released) == 1


async def test_close_before_start_frees_nothing():
    s = session()
    s.close()
    assert s.engine.released == []


async def test_a_stream_over_max_stream_seconds_is_recognised_up_to_the_limit_then_out_of_range():
    observer = RecordingObserver()
    s = session(observer=observer, max_stream_seconds=1.0)
    s.start(StreamConfig())
    s.feed(pcm(0.6))
    s.feed(pcm(0.6))  # crosses the limit: its first 0.4 s are kept
    assert LimitReason.MAX_STREAM_SECONDS in observer.limits
    results = []
    with pytest.raises(ASRError) as info:
        async for result in s.results():
            results.append(result)
    assert info.value.code is ErrorCode.OUT_OF_RANGE
    assert results[-1].is_final and results[-1].end_s == pytest.approx(1.0)


async def test_audio_feeds_the_idle_deadline_at_the_clients_rate(monkeypatch):
    clock = [time.monotonic()]
    monkeypatch.setattr("server.core.session.time", type("Clock", (), {"monotonic": staticmethod(lambda: clock[0])}))
    s = session(idle_timeout_seconds=10.0, min_audio_rate=0.5)
    opened = s.pace.opened_at
    s.start(StreamConfig(sample_rate_hertz=8000))
    assert s.pace.idle_deadline == pytest.approx(opened + 10.0)
    clock[0] = opened + 6.0
    s.feed(pcm(1.0, rate=8000))  # 4 s of credit left, 1 s of audio buys 2 s more
    assert s.pace.idle_deadline == pytest.approx(opened + 6.0 + 6.0)
    for _ in range(2):  # a trickle under --min-audio-rate: 3 s spent, 0.02 s bought each time
        clock[0] += 3.0
        s.feed(pcm(0.01, rate=8000))
    assert s.pace.idle_deadline == pytest.approx(opened + 12.04)
    s.close()


async def test_on_the_small_engine_a_stream_is_recognised_and_its_slot_freed():
    engine = Engine(small_model())
    scheduler = Scheduler(engine, max_chunks_per_stream=2)
    await scheduler.start()
    try:
        s = Session(engine, scheduler, ServerSettings(model="random-small"))
        s.start(StreamConfig())
        s.feed(pcm(1.5))
        s.finish_input()
        results = await drain(s)
        assert engine.streams_in_pool == 1
        s.close()
        s.close()
        await scheduler.run_on_engine_thread(lambda: None)  # the release runs on the inference thread
        assert engine.streams_in_pool == 0
        assert s.completed and results and results[-1].is_final and results[-1].end_s == pytest.approx(1.5)
    finally:
        await scheduler.stop()
