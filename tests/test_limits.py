"""Each per-stream limit on a real server: the status and message the client gets, the final
result it still gets where the limit ends a stream gracefully, and the metric of the hit."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest
from riva.client.proto import riva_asr_pb2 as rasr
from riva.client.proto import riva_asr_pb2_grpc as rasr_grpc
from riva.client.proto import riva_audio_pb2 as raudio

from asr.v1 import asr_pb2
from client.stream import pcm16
from server.app import RECEIVE_WINDOW_BYTES
from tests.conftest import running_server
from tests.helpers import transcript
from tests.observability import scrape
from tests.test_bad_input import audio, config, wait_sessions_freed

pytestmark = pytest.mark.timeout(120)


def whole_config() -> asr_pb2.StreamingRecognizeRequest:
    """A config without endpointing: one final result, at the end (as ``transcript`` streams)."""
    return config(endpointing=asr_pb2.EndpointingConfig(disabled=True))


def audio_of(pcm: bytes) -> asr_pb2.StreamingRecognizeRequest:
    return asr_pb2.StreamingRecognizeRequest(audio_content=pcm)


async def read_all(call) -> tuple[list, grpc.aio.AioRpcError | None]:
    """Every response of ``call`` and the error it ended with (None: OK)."""
    responses = []
    try:
        async for response in call:
            responses.append(response)
    except grpc.aio.AioRpcError as exc:
        return responses, exc
    return responses, None


def finals_of(responses) -> list:
    return [r for response in responses for r in response.results if r.is_final]


def limit_hits(server, reason: str) -> float:
    return scrape(server.metrics_port).value("asr_limit_hits_total", reason=reason)


# --- message size ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
async def small_messages():
    async with running_server(max_message_bytes=65536) as pair:
        yield pair


async def test_a_message_over_max_message_bytes_is_refused_and_counted(small_messages):
    server, stub = small_messages
    before = limit_hits(server, "max_message_bytes")
    call = stub.StreamingRecognize(iter([config(), audio(3200), audio(100_000)]))
    responses, error = await read_all(call)
    assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "100004 bytes" in error.details() and "--max-message-bytes" in error.details()
    with pytest.raises(grpc.aio.AioRpcError) as info:  # unary Recognize: the same rule
        await stub.Recognize(asr_pb2.RecognizeRequest(
            config=asr_pb2.RecognitionConfig(encoding=asr_pb2.LINEAR16, sample_rate_hertz=16000),
            audio_content=bytes(100_000)))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-message-bytes" in info.value.details()
    assert limit_hits(server, "max_message_bytes") == before + 2
    # over twice the limit, gRPC itself refuses the message before the server sees it
    _, error = await read_all(stub.StreamingRecognize(iter([config(), audio(140_000)])))
    assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await wait_sessions_freed(server)


async def test_riva_unary_message_over_the_limit(small_messages):
    server, _ = small_messages
    before = limit_hits(server, "max_message_bytes")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await rasr_grpc.RivaSpeechRecognitionStub(channel).Recognize(rasr.RecognizeRequest(
                config=rasr.RecognitionConfig(encoding=raudio.LINEAR_PCM, sample_rate_hertz=16000,
                                              language_code="en-US"), audio=bytes(100_000)))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert limit_hits(server, "max_message_bytes") == before + 1


# --- stream duration ---------------------------------------------------------------------------
async def test_a_stream_over_max_stream_seconds_gets_the_final_of_its_allowed_audio(speech):
    clip = speech[1][1]
    assert len(clip) > 3 * 16000
    async with running_server(max_stream_seconds=2.0) as (server, stub):
        expected = await transcript(stub, clip[:2 * 16000])
        requests = [whole_config()] + [audio_of(pcm16(clip[i:i + 4000])) for i in range(0, len(clip), 4000)]
        responses, error = await read_all(stub.StreamingRecognize(iter(requests)))
        await wait_sessions_freed(server)
        assert limit_hits(server, "max_stream_seconds") == 1
    assert error is not None and error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "--max-stream-seconds" in error.details() and "final result" in error.details()
    finals = finals_of(responses)
    assert finals and finals[-1].result_end_time.ToTimedelta().total_seconds() <= 2.0
    assert " ".join(f.alternatives[0].transcript for f in finals) == expected


# --- audio buffered ahead: backpressure --------------------------------------------------------
class PausedEngine:
    """Wraps the scheduler's runner; steps wait until ``resume``."""

    def __init__(self, runner):
        self.runner = runner
        self.running = threading.Event()

    def run_batch(self, items):
        assert self.running.wait(60), "the test never resumed the engine"
        return self.runner.run_batch(items)


async def test_audio_ahead_of_recognition_is_bounded_by_flow_control(speech):
    """With the engine paused, a client sending as fast as it can gets at most
    --max-buffered-seconds into the session plus one HTTP/2 stream window through before its
    writes block; once the engine resumes, nothing was lost. The 2 s it was held back do not
    count as idle (the idle timeout is 1 s)."""
    clip = np.concatenate([speech[0][1], speech[1][1], speech[2][1]])  # ~8 s
    pcm = pcm16(clip)
    async with running_server(max_buffered_seconds=1.0, idle_timeout_seconds=1.0) as (server, stub):
        expected = await transcript(stub, clip)
        paused = PausedEngine(server.service.scheduler.runner)
        server.service.scheduler.runner = paused
        call = stub.StreamingRecognize()
        await call.write(whole_config())
        written = 0

        async def send():
            nonlocal written
            for i in range(0, len(pcm), 3200):  # 0.1 s messages
                await call.write(audio_of(pcm[i:i + 3200]))
                written += len(pcm[i:i + 3200])
            await call.done_writing()

        sender = asyncio.create_task(send())
        reader = asyncio.create_task(read_all(call))
        await asyncio.sleep(2.0)
        session = next(iter(server.service.sessions.live.values()))
        buffered, written_while_paused = session.buffered_seconds, written
        assert not sender.done()
        paused.running.set()
        await sender
        responses, error = await reader
        await wait_sessions_freed(server)
        assert limit_hits(server, "max_buffered_seconds") >= 1
    assert buffered <= 1.0 + 0.1 + 0.2  # the limit, one message, one window's slack
    assert written_while_paused <= 32000 * 1.1 + RECEIVE_WINDOW_BYTES + 2 * 64 * 1024, written_while_paused
    assert error is None
    assert " ".join(f.alternatives[0].transcript for f in finals_of(responses)) == expected


# --- idle timeout ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
async def impatient():
    async with running_server(idle_timeout_seconds=1.0) as pair:
        yield pair


async def test_an_idle_stream_gets_its_final_result_then_out_of_range(impatient, speech):
    server, stub = impatient
    before = limit_hits(server, "idle_timeout")
    clip = speech[0][1][:2 * 16000]
    expected = await transcript(stub, clip)
    call = stub.StreamingRecognize()
    await call.write(whole_config())
    await call.write(audio_of(pcm16(clip)))
    started = time.monotonic()
    for _ in range(20):  # empty messages are no audio: they do not keep the stream alive
        await asyncio.sleep(0.2)
        try:
            await call.write(audio_of(b""))
        except grpc.aio.AioRpcError:  # the server ended the call
            break
    else:
        pytest.fail("4 s of empty messages kept the stream alive")
    responses, error = await read_all(call)
    assert time.monotonic() - started >= 1.0
    assert error is not None and error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "no audio for 1 s" in error.details() and "--idle-timeout-seconds" in error.details()
    assert " ".join(f.alternatives[0].transcript for f in finals_of(responses)) == expected
    assert limit_hits(server, "idle_timeout") == before + 1
    await wait_sessions_freed(server)


async def test_a_stream_that_never_sends_its_config_times_out(impatient):
    server, stub = impatient
    call = stub.StreamingRecognize()
    await call.wait_for_connection()
    responses, error = await read_all(call)
    assert responses == []
    assert error is not None and error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "no streaming_config within 1 s" in error.details()
    await wait_sessions_freed(server)


async def test_riva_streams_time_out_too(impatient, speech):
    server, _ = impatient
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = rasr_grpc.RivaSpeechRecognitionStub(channel).StreamingRecognize()
        await call.write(rasr.StreamingRecognizeRequest(streaming_config=rasr.StreamingRecognitionConfig(
            config=rasr.RecognitionConfig(encoding=raudio.LINEAR_PCM, sample_rate_hertz=16000,
                                          language_code="en-US"))))
        await call.write(rasr.StreamingRecognizeRequest(audio_content=pcm16(speech[0][1][:16000])))
        responses, error = await read_all(call)
    assert error is not None and error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert any(r.is_final for response in responses for r in response.results)
    await wait_sessions_freed(server)


def test_limits_are_validated():
    from pydantic import ValidationError

    from server.config import ServerSettings

    defaults = ServerSettings()
    assert (defaults.idle_timeout_seconds, defaults.drain_timeout, defaults.latency_budget_ms) == (30.0, 20.0, 160.0)
    for field, bad in (("idle_timeout_seconds", 0), ("drain_timeout", -1), ("latency_budget_ms", -5)):
        with pytest.raises(ValidationError, match=field):
            ServerSettings(**{field: bad})
