"""Bad input gets a specific status and a readable message; every session is freed."""

import asyncio

import grpc
import numpy as np
import pytest

from asr.v1 import asr_pb2
from client.stream import pcm16
from tests.conftest import running_server


def config(interim: bool = False, **kw) -> asr_pb2.StreamingRecognizeRequest:
    rc = dict(encoding=asr_pb2.LINEAR16, sample_rate_hertz=16000)
    rc.update(kw)
    return asr_pb2.StreamingRecognizeRequest(streaming_config=asr_pb2.StreamingRecognitionConfig(
        config=asr_pb2.RecognitionConfig(**rc), interim_results=interim))


def audio(n_bytes: int) -> asr_pb2.StreamingRecognizeRequest:
    return asr_pb2.StreamingRecognizeRequest(audio_content=bytes(n_bytes))


async def call(stub, requests):
    async def gen():
        for r in requests:
            yield r
    return [r async for r in stub.StreamingRecognize(gen())]


async def wait_sessions_freed(server, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while server.active_sessions and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    assert server.active_sessions == 0
    # the engine's left-context slots are released on the inference thread
    await server.service.scheduler.run_on_engine_thread(lambda: None)
    assert server.service.engine.streams_in_pool == 0


CASES = {
    "audio before config": ([audio(3200)], grpc.StatusCode.INVALID_ARGUMENT, "first message"),
    "config twice": ([config(), audio(3200), config()], grpc.StatusCode.INVALID_ARGUMENT, "sent twice"),
    "unknown encoding": ([config(encoding=7), audio(100)], grpc.StatusCode.INVALID_ARGUMENT, "encoding"),
    "unspecified encoding": ([config(encoding=0)], grpc.StatusCode.INVALID_ARGUMENT, "encoding"),
    "sample rate too low": ([config(sample_rate_hertz=4000)], grpc.StatusCode.INVALID_ARGUMENT,
                            "sample_rate_hertz"),
    "sample rate too high": ([config(sample_rate_hertz=96000)], grpc.StatusCode.INVALID_ARGUMENT,
                             "sample_rate_hertz"),
    "odd byte count": ([config(), audio(3201)], grpc.StatusCode.INVALID_ARGUMENT, "multiple of 2"),
    "odd byte count stereo": ([config(audio_channel_count=2), audio(3202)], grpc.StatusCode.INVALID_ARGUMENT,
                              "multiple of 4"),
    "empty stream": ([], grpc.StatusCode.INVALID_ARGUMENT, "first message"),
    "empty request": ([config(), asr_pb2.StreamingRecognizeRequest()], grpc.StatusCode.INVALID_ARGUMENT,
                      "must carry"),
    "too many channels": ([config(audio_channel_count=9)], grpc.StatusCode.INVALID_ARGUMENT,
                          "audio_channel_count"),
    "beam too wide": ([config(decoding_method=asr_pb2.BEAM_SEARCH, beam_width=1000)],
                      grpc.StatusCode.INVALID_ARGUMENT, "beam_width"),
    "message over the size limit": ([config(), audio(70_000)], grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than"),
}


@pytest.fixture(scope="module")
async def limited_server():
    async with running_server(max_message_bytes=65536) as pair:
        yield pair


@pytest.mark.parametrize("case", list(CASES))
async def test_bad_stream_input_gets_clear_status_and_frees_session(limited_server, case):
    server, stub = limited_server
    requests, code, words = CASES[case]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(stub, requests)
    assert info.value.code() == code, info.value.details()
    assert words in info.value.details()
    await wait_sessions_freed(server)


async def test_nan_float32_audio_is_refused(limited_server):
    server, stub = limited_server
    bad = np.array([0.0, np.nan, 0.1], dtype="<f4").tobytes()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(stub, [config(encoding=asr_pb2.FLOAT32), asr_pb2.StreamingRecognizeRequest(audio_content=bad)])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "NaN" in info.value.details()
    await wait_sessions_freed(server)


async def test_unary_recognize_bad_input(limited_server):
    server, stub = limited_server
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Recognize(asr_pb2.RecognizeRequest(
            config=asr_pb2.RecognitionConfig(encoding=asr_pb2.LINEAR16, sample_rate_hertz=1000),
            audio_content=bytes(320)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await wait_sessions_freed(server)


async def test_config_without_audio_ends_cleanly(limited_server):
    server, stub = limited_server
    assert await call(stub, [config()]) == []
    await wait_sessions_freed(server)


async def test_client_cancel_mid_stream_frees_session(limited_server, speech):
    server, stub = limited_server
    pcm = pcm16(speech[0][1])

    async def slow_requests():
        yield config(interim=True)
        for i in range(0, len(pcm), 5120):
            yield asr_pb2.StreamingRecognizeRequest(audio_content=pcm[i:i + 5120])
            await asyncio.sleep(0.05)

    call_ = stub.StreamingRecognize(slow_requests())
    got = 0
    async for _ in call_:
        got += 1
        if got == 2:
            assert server.active_sessions == 1
            call_.cancel()
            break
    await wait_sessions_freed(server)


async def test_client_disconnect_mid_stream_frees_session(speech):
    """The channel closes under an active stream (the client process went away)."""
    async with running_server() as (server, _):
        from asr.v1 import asr_pb2_grpc
        from client.stream import channel

        ch = channel(f"127.0.0.1:{server.port}")
        stub = asr_pb2_grpc.SpeechRecognitionStub(ch)
        pcm = pcm16(speech[0][1])

        async def requests():
            yield config()
            for i in range(0, len(pcm), 5120):
                yield asr_pb2.StreamingRecognizeRequest(audio_content=pcm[i:i + 5120])
                await asyncio.sleep(0.05)

        async def consume():
            return [r async for r in stub.StreamingRecognize(requests())]

        task = asyncio.create_task(consume())
        for _ in range(500):
            if server.active_sessions:
                break
            await asyncio.sleep(0.01)
        assert server.active_sessions == 1
        await ch.close()
        with pytest.raises((grpc.aio.AioRpcError, asyncio.CancelledError)):
            await task
        await wait_sessions_freed(server)
