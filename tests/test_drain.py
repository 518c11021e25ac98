"""Graceful drain of a real ``asr-server`` process on SIGTERM (client.spawn starts the console
script): health turns NOT_SERVING, new streams get UNAVAILABLE, open streams end with their
final results, the process exits 0; a second signal stops it at once."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asr.v1 import asr_pb2, asr_pb2_grpc
from client.spawn import spawned_server
from client.stream import StreamOptions, pcm16, stream_audio
from tests.helpers import transcript

pytestmark = pytest.mark.timeout(240)


@contextlib.asynccontextmanager
async def server_process(*args: str):
    """A spawned ``asr-server --model random-small ARGS`` (no load shedding: the streams here must
    run on a loaded test machine); yields (channel, process)."""
    manager = spawned_server("--model", "random-small", "--latency-budget-ms", "0", *args,
                             env={"ASR_LOG_LEVEL": "info"})
    address, proc = await asyncio.to_thread(manager.__enter__)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            yield channel, proc
    finally:
        await asyncio.to_thread(manager.__exit__, None, None, None)


async def health(channel) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return response.status


async def eventually(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def paced(stub, audio: np.ndarray, started: asyncio.Event | None = None):
    """A real-time stream to its end: (final transcripts, status code, details); ``started`` is
    set at its first response (the server has the stream)."""
    options = StreamOptions(realtime=True, interim_results=True, endpointing=False)
    finals = []
    try:
        async for event in stream_audio(stub, pcm16(audio), 16000, options):
            if started is not None:
                started.set()
            finals += [r.alternatives[0].transcript for r in event.response.results if r.is_final]
    except grpc.aio.AioRpcError as exc:
        return finals, exc.code(), exc.details()
    return finals, grpc.StatusCode.OK, ""


async def wait_exit(proc, timeout: float = 60.0) -> int:
    return await asyncio.to_thread(proc.wait, timeout)


def whole_config() -> asr_pb2.StreamingRecognizeRequest:
    """No endpointing (one final, at the end), interim results (the first one shows that the
    server has the stream)."""
    return asr_pb2.StreamingRecognizeRequest(streaming_config=asr_pb2.StreamingRecognitionConfig(
        config=asr_pb2.RecognitionConfig(encoding=asr_pb2.LINEAR16, sample_rate_hertz=16000,
                                         endpointing=asr_pb2.EndpointingConfig(disabled=True)),
        interim_results=True))


async def open_stream(stub, audio: np.ndarray):
    """A stream with ``audio`` sent and no half-close, once the server has recognised some of it."""
    call = stub.StreamingRecognize()
    await call.write(whole_config())
    await call.write(asr_pb2.StreamingRecognizeRequest(audio_content=pcm16(audio)))
    first = await call.read()
    assert not first.results[0].is_final
    return call


async def test_sigterm_lets_running_streams_finish_then_exits_0(speech):
    clips = [audio[:int(3.5 * 16000)] for _, audio, _ in speech[:4]]
    async with server_process("--drain-timeout", "60") as (channel, proc):
        stub = asr_pb2_grpc.SpeechRecognitionStub(channel)
        references = [await transcript(stub, clip) for clip in clips]
        assert await health(channel) == health_pb2.HealthCheckResponse.SERVING
        started = [asyncio.Event() for _ in clips]
        streams = [asyncio.create_task(paced(stub, clip, event)) for clip, event in zip(clips, started)]
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), 30)
        proc.send_signal(signal.SIGTERM)
        await eventually(lambda: _is(health(channel), health_pb2.HealthCheckResponse.NOT_SERVING))
        late, code, details = await paced(stub, clips[0])
        assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details and late == []
        assert not any(s.done() for s in streams)  # still running during the drain
        outcomes = await asyncio.gather(*streams)
        assert await wait_exit(proc) == 0
    for (finals, code, details), reference in zip(outcomes, references):
        assert code == grpc.StatusCode.OK, details
        assert " ".join(t for t in finals if t) == reference


async def _is(awaitable, value) -> bool:
    try:
        return await awaitable == value
    except grpc.aio.AioRpcError:
        return False


async def test_streams_open_at_the_drain_timeout_get_their_final_then_unavailable(speech):
    """Streams still open (audio sent, no half-close) when --drain-timeout passes: each gets the
    final result of everything it sent, then UNAVAILABLE; the process exits 0."""
    clips = [audio[:int(2 * 16000)] for _, audio, _ in speech[:3]]
    async with server_process("--drain-timeout", "1.5") as (channel, proc):
        stub = asr_pb2_grpc.SpeechRecognitionStub(channel)
        references = [await transcript(stub, clip) for clip in clips]
        calls = [await open_stream(stub, clip) for clip in clips]
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        outcomes = []
        for call in calls:
            finals = []
            with pytest.raises(grpc.aio.AioRpcError) as info:
                while (response := await call.read()) is not grpc.aio.EOF:
                    finals += [r.alternatives[0].transcript for r in response.results if r.is_final]
            outcomes.append((finals, info.value))
        waited = time.monotonic() - started
        assert await wait_exit(proc) == 0
    assert waited >= 1.5
    for (finals, error), reference in zip(outcomes, references):
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "--drain-timeout" in error.details() and "final result" in error.details()
        assert " ".join(t for t in finals if t) == reference


async def test_a_second_signal_stops_at_once(speech):
    async with server_process("--drain-timeout", "120") as (channel, proc):
        stub = asr_pb2_grpc.SpeechRecognitionStub(channel)
        call = await open_stream(stub, speech[0][1][:16000])
        proc.send_signal(signal.SIGTERM)
        await eventually(lambda: _is(health(channel), health_pb2.HealthCheckResponse.NOT_SERVING))
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert await wait_exit(proc, 30) == 1
        assert time.monotonic() - started < 20
        with pytest.raises(grpc.aio.AioRpcError) as info:
            while await call.read() is not grpc.aio.EOF:
                pass
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


@pytest.mark.parametrize("chunk_ms, interim", [(160, False), (20, True), (1000, False)])
async def test_drain_timeout_ends_every_client_with_unavailable_whatever_its_pacing(chunk_ms, interim):
    """A client still sending when --drain-timeout expires gets its final result and the retryable
    UNAVAILABLE, whether its messages are small or large and whether or not it asked for interim
    results (audio that arrives after the server ended the stream is dropped, not an error)."""
    import soundfile

    from tests.conftest import ROOT, running_server

    audio = np.concatenate([soundfile.read(str(p), dtype="float32")[0]
                            for p in sorted((ROOT / "bench" / "audio").glob("*.wav"))])
    assert len(audio) > 16000 * 10
    async with running_server() as (server, stub):
        options = StreamOptions(realtime=True, interim_results=interim, endpointing=False, chunk_ms=chunk_ms)

        async def client():
            finals = []
            try:
                async for event in stream_audio(stub, pcm16(audio), 16000, options):
                    finals += [r for r in event.response.results if r.is_final]
            except grpc.aio.AioRpcError as exc:
                return exc.code(), exc.details(), finals
            return grpc.StatusCode.OK, "", finals

        task = asyncio.ensure_future(client())
        await asyncio.sleep(2.0)
        assert not await server.drain(0.3)
        code, details, finals = await asyncio.wait_for(task, 30)
    assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
    assert "--drain-timeout" in details and finals, "the final result of the audio received comes first"
