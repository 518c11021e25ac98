"""Prometheus metrics: what a real server exports over HTTP while real streams run, the hooks
behind them, the --metrics-* options, and the module boundaries around prometheus_client."""

from __future__ import annotations

import asyncio
import gc
import math
import socket

import grpc
import numpy as np
import pytest
from pydantic import ValidationError

from asr.v1 import asr_pb2
from client.stream import StreamOptions, pcm16, stream_audio
from server import __version__
from server.config import ServerSettings
from server.errors import ASRError, ErrorCode
from server.observability.metrics import API_LABELS, ENGINE_STAGES, METRIC_NAMES, Metrics
from server.observability.observer import EngineLoad, first_step_stats
from server.types import (KNOWN_APIS, SEGMENT_SAMPLES, BatchRecord, FinalTrigger, LimitReason, StepStats,
                          StreamOutcome, StreamStats, api_label, outcome_of)
from tests.conftest import ROOT, running_server
from tests.helpers import transcript
from tests.observability import promtool, scrape, scrape_text


def streaming_config(interim: bool = False, **kw) -> asr_pb2.StreamingRecognizeRequest:
    rc = dict(encoding=asr_pb2.LINEAR16, sample_rate_hertz=16000)
    rc.update(kw)
    return asr_pb2.StreamingRecognizeRequest(streaming_config=asr_pb2.StreamingRecognitionConfig(
        config=asr_pb2.RecognitionConfig(**rc), interim_results=interim))


def audio_request(pcm: bytes) -> asr_pb2.StreamingRecognizeRequest:
    return asr_pb2.StreamingRecognizeRequest(audio_content=pcm)


async def eventually(predicate, timeout: float = 10.0):
    """Wait until ``predicate()`` is true (state that settles on the server after a call returns)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


class OpenStream:
    """A streaming call held open by the test: config sent, audio on demand, half-close on exit."""

    def __init__(self, stub, config=None):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.queue.put_nowait(config or streaming_config(interim=True))
        self.call = stub.StreamingRecognize(self._requests())

    async def _requests(self):
        while (item := await self.queue.get()) is not None:
            yield item

    def send(self, pcm: bytes) -> None:
        self.queue.put_nowait(audio_request(pcm))

    async def finish(self) -> list:
        self.queue.put_nowait(None)
        return [r async for r in self.call]


# --- units: the plain hooks and their label sets ----------------------------------------------
def test_outcomes_are_classified_from_what_ended_the_stream():
    assert outcome_of(None) is StreamOutcome.OK
    assert outcome_of(asyncio.CancelledError()) is StreamOutcome.CANCELLED
    assert outcome_of(GeneratorExit()) is StreamOutcome.CANCELLED
    assert outcome_of(ASRError(ErrorCode.INVALID_ARGUMENT, "x")) is StreamOutcome.INVALID
    assert outcome_of(ASRError(ErrorCode.OUT_OF_RANGE, "x")) is StreamOutcome.INVALID
    assert outcome_of(ASRError(ErrorCode.RESOURCE_EXHAUSTED, "x")) is StreamOutcome.REJECTED
    assert outcome_of(ASRError(ErrorCode.UNAUTHENTICATED, "x")) is StreamOutcome.REJECTED
    assert outcome_of(ASRError(ErrorCode.INTERNAL, "x")) is StreamOutcome.ERROR
    assert outcome_of(RuntimeError("boom")) is StreamOutcome.ERROR


def test_api_labels_are_bounded():
    assert [api_label(a) for a in KNOWN_APIS] == list(KNOWN_APIS)
    assert api_label("some-new-protocol") == "other"
    assert set(API_LABELS) == {"asr.v1", "riva", "google", "openai", "deepgram", "other"}


def test_engine_load_is_busy_time_over_audio_in_a_sliding_window():
    load = EngineLoad(window_s=10.0)
    assert load.rtf(now=100.0) == 0.0
    load.add(0.08, 4 * 0.16, now=100.0)  # 80 ms for 4 streams' chunks
    load.add(0.04, 2 * 0.16, now=105.0)
    assert load.rtf(now=105.0) == pytest.approx(0.12 / 0.96)
    assert load.rtf(now=112.0) == pytest.approx(0.04 / 0.32)  # the first step left the window
    assert load.rtf(now=120.0) == 0.0


def test_observer_maps_a_batch_and_a_stream_onto_metrics():
    metrics = Metrics(version="v", model="m", precision="fp32", device="cpu")
    obs = metrics.observer
    step = StepStats(features=0.001, encoder=0.02, decoder=0.005, total=0.026)
    obs.batch_done(BatchRecord(3, 0.03, False, outputs=()), step)
    obs.batch_done(BatchRecord(2, 0.5, True, outputs=()), None)
    get = metrics.registry.get_sample_value
    assert get("asr_batch_size_sum") == 5 and get("asr_batch_size_count") == 2
    assert get("asr_engine_step_seconds_count") == 2
    assert get("asr_engine_busy_seconds_total") == pytest.approx(0.53)
    assert get("asr_engine_step_failures_total") == 1
    assert get("asr_engine_stage_seconds_sum", {"stage": "encoder"}) == pytest.approx(0.02)
    assert get("asr_engine_stage_seconds_count", {"stage": "decoder"}) == 1
    assert get("asr_engine_rtf") == pytest.approx(0.53 / (5 * 0.16))
    stats = StreamStats(audio_seconds=2.0, compute_seconds=0.1, chunks=13)
    obs.stream_ended("riva", StreamOutcome.OK, stats)
    obs.stream_ended("telnet", StreamOutcome.REJECTED, None)
    assert get("asr_streams_total", {"api": "riva", "outcome": "ok"}) == 1
    assert get("asr_streams_total", {"api": "other", "outcome": "rejected"}) == 1
    assert get("asr_stream_rtf_sum") == pytest.approx(0.05) and get("asr_stream_rtf_count") == 1
    obs.final_result("asr.v1", FinalTrigger.ENDPOINT, 0.07)
    assert get("asr_final_result_latency_seconds_bucket", {"trigger": "endpoint", "le": "0.06"}) == 0
    assert get("asr_final_result_latency_seconds_bucket", {"trigger": "endpoint", "le": "0.08"}) == 1


def test_step_stats_are_found_among_the_runner_outputs():
    class Out:
        def __init__(self, s):
            self.step_stats = s
    stats = StepStats()
    assert first_step_stats([ASRError(ErrorCode.INTERNAL, "x"), Out(stats)]) is stats
    assert first_step_stats(()) is None


# --- a real server, scraped over HTTP ----------------------------------------------------------
async def test_every_series_exists_at_zero_before_any_traffic():
    async with running_server() as (server, _):
        assert server.metrics_port > 0
        m = scrape(server.metrics_port)
    for name in METRIC_NAMES:
        assert m.help.get(name), f"{name} has no HELP"
    assert m.types["asr_chunk_latency_seconds"] == "histogram"
    assert m.types["asr_streams_total"] == "counter" and m.types["asr_active_streams"] == "gauge"
    for api in API_LABELS:
        assert m.value("asr_active_streams", api=api) == 0
        assert m.value("asr_audio_seconds_total", api=api) == 0
        for outcome in StreamOutcome:
            assert m.value("asr_streams_total", api=api, outcome=outcome.value) == 0
    for code in ErrorCode:
        assert m.value("asr_errors_total", code=code.name) == 0
    for reason in LimitReason:
        assert m.value("asr_limit_hits_total", reason=reason.value) == 0
    for stage in ENGINE_STAGES:
        assert m.value("asr_engine_stage_seconds_count", stage=stage) == 0
    for trigger in FinalTrigger:
        assert m.value("asr_final_result_latency_seconds_count", trigger=trigger.value) == 0
    assert m.value("asr_build_info", version=__version__, model="random-small", precision="fp32",
                   device="cpu") == 1
    # no label value is unbounded: every labelled sample uses a known label name
    allowed = {"api", "outcome", "code", "reason", "stage", "trigger", "le", "version", "model", "precision",
               "device", "generation"}
    for (name, labels) in m.samples:
        if name.startswith("asr_"):
            assert {k for k, _ in labels} <= allowed, (name, labels)


async def test_garbage_collections_are_timed_by_generation():
    callbacks = len(gc.callbacks)
    async with running_server() as (server, _):
        before = scrape(server.metrics_port)
        for generation in ("0", "1", "2"):
            assert before.value("asr_gc_pause_seconds_count", generation=generation) >= 0  # exists
        gc.collect()  # a full collection, as the process makes when its heap has grown
        gc.collect(0)
        after = scrape(server.metrics_port)
        for generation in ("0", "2"):
            assert (after.value("asr_gc_pause_seconds_count", generation=generation)
                    >= before.value("asr_gc_pause_seconds_count", generation=generation) + 1)
        assert after.value("asr_gc_pause_seconds_sum", generation="2") > 0
    assert len(gc.callbacks) == callbacks  # a stopped server times nothing


@pytest.mark.system  # promtool (Debian prometheus) checks the exposition
async def test_a_stream_fills_the_metrics_consistently(speech):
    name, audio, _ = speech[0]
    async with running_server() as (server, stub):
        responses = [e.response async for e in stream_audio(
            stub, pcm16(audio), 16000, StreamOptions(realtime=False, interim_results=True, endpointing=False))]
        assert [r for e in responses for r in e.results if r.is_final and r.alternatives[0].transcript]
        await eventually(lambda: server.active_sessions == 0)
        m = scrape(server.metrics_port)
        text = scrape_text(server.metrics_port)
    chunks = math.ceil(len(audio) / SEGMENT_SAMPLES)
    assert m.value("asr_chunk_latency_seconds_count") == chunks
    assert m.value("asr_queue_wait_seconds_count") == chunks
    assert m.value("asr_chunk_latency_seconds_sum") > 0
    assert m.value("asr_audio_seconds_total", api="asr.v1") == pytest.approx(len(audio) / 16000, abs=1e-6)
    # every chunk ran in exactly one batch
    assert m.value("asr_batch_size_sum") == chunks
    steps = m.value("asr_engine_step_seconds_count")
    assert 1 <= steps <= chunks and m.value("asr_batch_size_count") == steps
    for stage in ENGINE_STAGES:
        assert m.value("asr_engine_stage_seconds_count", stage=stage) == steps
    assert m.value("asr_engine_busy_seconds_total") == pytest.approx(m.value("asr_engine_step_seconds_sum"))
    assert m.value("asr_engine_rtf") > 0
    assert m.value("asr_streams_total", api="asr.v1", outcome="ok") == 1
    assert m.value("asr_stream_rtf_count") == 1 and m.value("asr_stream_rtf_sum") > 0
    assert m.value("asr_time_to_first_result_seconds_count") == 1
    assert m.value("asr_final_result_latency_seconds_count", trigger="end_of_stream") == 1
    assert m.value("asr_active_streams", api="asr.v1") == 0
    assert sum(m.series("asr_errors_total").values()) == 0
    # histogram buckets are cumulative and end at the count
    buckets = sorted(((float(dict(labels)["le"]), v) for labels, v in m.series(
        "asr_chunk_latency_seconds_bucket").items()))
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert buckets[-1] == (math.inf, chunks)
    result = promtool("check", "metrics", stdin=text)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_active_streams_are_counted_per_protocol(speech):
    pcm = pcm16(speech[1][1])
    async with running_server() as (server, stub):
        stream = OpenStream(stub)
        stream.send(pcm[:16000])
        await eventually(lambda: server.active_sessions == 1)
        # the Riva / Google adapters open sessions through the same service call
        riva = server.service.open_session("riva")
        other = server.service.open_session("some-other-protocol")
        m = scrape(server.metrics_port)
        assert m.value("asr_active_streams", api="asr.v1") == 1
        assert m.value("asr_active_streams", api="riva") == 1
        assert m.value("asr_active_streams", api="google") == 0
        assert m.value("asr_active_streams", api="other") == 1
        server.service.close_session(riva)
        server.service.close_session(riva)  # closing twice reports once
        server.service.close_session(other, ASRError(ErrorCode.INTERNAL, "test"))
        await stream.finish()
        await eventually(lambda: server.active_sessions == 0)
        m = scrape(server.metrics_port)
    assert sum(m.series("asr_active_streams").values()) == 0
    # closed before its results were delivered, with no error: the client went away
    assert m.value("asr_streams_total", api="riva", outcome="cancelled") == 1
    assert m.value("asr_streams_total", api="other", outcome="error") == 1
    assert m.value("asr_streams_total", api="asr.v1", outcome="ok") == 1


async def test_errors_and_outcomes_by_status(speech):
    pcm = pcm16(speech[0][1])
    async with running_server() as (server, stub):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            stream = OpenStream(stub, streaming_config(sample_rate_hertz=1000))
            await stream.finish()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError):  # audio before the config: no session config at all
            await stub.StreamingRecognize(iter([audio_request(pcm[:3200])])).read()
        # a client that cancels mid-stream
        stream = OpenStream(stub)
        stream.send(pcm[:32000])
        await stream.call.read()
        stream.call.cancel()
        await eventually(lambda: server.active_sessions == 0)
        # unary Recognize counts as a stream too
        response = await stub.Recognize(asr_pb2.RecognizeRequest(
            config=asr_pb2.RecognitionConfig(encoding=asr_pb2.LINEAR16, sample_rate_hertz=16000),
            audio_content=pcm))
        assert response.results
        await eventually(lambda: scrape(server.metrics_port).value(
            "asr_streams_total", api="asr.v1", outcome="cancelled") == 1)
        m = scrape(server.metrics_port)
    assert m.value("asr_errors_total", code="INVALID_ARGUMENT") == 2
    assert m.value("asr_streams_total", api="asr.v1", outcome="invalid") == 2
    assert m.value("asr_streams_total", api="asr.v1", outcome="ok") == 1
    assert m.value("asr_streams_total", api="asr.v1", outcome="error") == 0
    assert m.value("asr_audio_seconds_total", api="asr.v1") >= len(pcm) / 2 / 16000


async def test_limit_hits_by_reason(speech):
    pcm = pcm16(np.concatenate([speech[2][1], speech[3][1]]))
    assert len(pcm) / 32000 > 3.5
    async with running_server(max_streams=1, max_stream_seconds=3.0, max_buffered_seconds=1.0) as (server, stub):
        first = OpenStream(stub)
        first.send(pcm[:3200])
        await eventually(lambda: server.active_sessions == 1)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await OpenStream(stub).finish()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # the open stream goes on: more audio than it may buffer, then more than it may send
        first.send(pcm[3200:3200 + 48000])
        first.send(pcm[3200 + 48000:])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await first.finish()
        assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
        await eventually(lambda: server.active_sessions == 0)
        server.service.sessions.draining = True
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await OpenStream(stub).finish()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        m = scrape(server.metrics_port)
    assert m.value("asr_limit_hits_total", reason="max_streams") == 1
    assert m.value("asr_limit_hits_total", reason="max_buffered_seconds") >= 1
    assert m.value("asr_limit_hits_total", reason="max_stream_seconds") == 1
    assert m.value("asr_limit_hits_total", reason="draining") == 1
    assert m.value("asr_streams_total", api="asr.v1", outcome="rejected") == 2
    assert m.value("asr_streams_total", api="asr.v1", outcome="invalid") == 1
    assert m.value("asr_errors_total", code="RESOURCE_EXHAUSTED") == 1
    assert m.value("asr_errors_total", code="OUT_OF_RANGE") == 1
    assert m.value("asr_errors_total", code="UNAVAILABLE") == 1


# --- options -------------------------------------------------------------------------------
def test_metrics_options_are_validated():
    assert ServerSettings().metrics_port == 9400
    assert ServerSettings(metrics_port=-1).metrics_port == -1
    for bad in (-2, 65536):
        with pytest.raises(ValidationError, match="metrics_port"):
            ServerSettings(metrics_port=bad)
    with pytest.raises(ValidationError, match="metrics_host"):
        ServerSettings(metrics_host="")


async def test_metrics_endpoint_can_be_turned_off(speech):
    async with running_server(metrics_port=-1) as (server, stub):
        assert server.metrics is None and server.metrics_port == 0
        assert await transcript(stub, speech[0][1][:16000]) is not None  # the hot path runs without metrics


async def test_metrics_endpoint_binds_the_chosen_address():
    async with running_server(metrics_host="127.0.0.2") as (server, _):
        assert scrape(server.metrics_port, host="127.0.0.2").value("asr_scheduler_queue_depth") == 0
        with pytest.raises(OSError):
            scrape_text(server.metrics_port, host="127.0.0.1")


async def test_a_taken_metrics_port_stops_start_up_naming_the_option():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="--metrics-port"):
            async with running_server(metrics_port=port):
                pass


def test_stream_rtf_is_zero_without_audio():
    assert StreamStats().rtf == 0.0
    assert np.isfinite(StreamStats(audio_seconds=1.0, compute_seconds=0.2).rtf)


async def test_riva_streams_are_counted_under_their_protocol():
    """The Riva adapter's sessions (unmodified riva.client) land under api="riva", with outcomes."""
    import riva.client

    wav = sorted((ROOT / "samples").glob("*.wav"))[0]

    def riva_stream(language: str) -> list:
        asr = riva.client.ASRService(riva.client.Auth(uri=f"127.0.0.1:{server.port}", use_ssl=False))
        config = riva.client.StreamingRecognitionConfig(
            config=riva.client.RecognitionConfig(language_code=language, max_alternatives=1), interim_results=True)
        riva.client.add_audio_file_specs_to_config(config, wav)
        try:
            with riva.client.AudioChunkFileIterator(str(wav), 3200) as chunks:
                return list(asr.streaming_response_generator(chunks, config))
        finally:
            asr.auth.channel.close()

    async with running_server() as (server, _):
        assert await asyncio.to_thread(riva_stream, "en-US")
        with pytest.raises(grpc.RpcError) as info:
            await asyncio.to_thread(riva_stream, "de-DE")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await eventually(lambda: server.active_sessions == 0)
        m = scrape(server.metrics_port)
    assert m.value("asr_streams_total", api="riva", outcome="ok") == 1
    assert m.value("asr_streams_total", api="riva", outcome="invalid") == 1
    assert m.value("asr_audio_seconds_total", api="riva") > 1.0
    assert m.value("asr_audio_seconds_total", api="asr.v1") == 0
    assert m.value("asr_errors_total", code="INVALID_ARGUMENT") == 1
