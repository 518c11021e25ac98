"""Serving from a fleet: a maximum connection age moves a client's new streams to a new connection
without cutting the stream that is open (unless the grace period is shorter than it), and
client-side round robin (``ipv4:`` and ``dns:///`` targets) spreads streams across real servers."""

from __future__ import annotations

import time

import grpc
import pytest

from asr.v1 import asr_pb2_grpc
from client.stream import StreamOptions, channel, pcm16, stream_audio
from server.app import connection_options
from server.config import ServerSettings
from tests.conftest import running_server
from tests.helpers import transcript

pytestmark = pytest.mark.timeout(180)


async def paced(stub, audio) -> tuple[list[str], grpc.StatusCode, float]:
    """A real-time stream to its end: (final transcripts, status, seconds it took)."""
    options = StreamOptions(realtime=True, interim_results=True, endpointing=False)
    finals, started = [], time.monotonic()
    try:
        async for event in stream_audio(stub, pcm16(audio), 16000, options):
            finals += [r.alternatives[0].transcript for r in event.response.results if r.is_final]
    except grpc.aio.AioRpcError as exc:
        return finals, exc.code(), time.monotonic() - started
    return finals, grpc.StatusCode.OK, time.monotonic() - started


def test_connection_options_map_the_settings():
    off = dict(connection_options(ServerSettings(keepalive_time_seconds=0)))
    assert off["grpc.keepalive_time_ms"] == 2**31 - 1 and "grpc.max_connection_age_ms" not in off
    aged = dict(connection_options(ServerSettings(max_connection_age_seconds=300, max_connection_age_grace_seconds=30,
                                                  keepalive_permit_without_calls=True)))
    assert aged["grpc.max_connection_age_ms"] == 300_000 and aged["grpc.max_connection_age_grace_ms"] == 30_000
    assert aged["grpc.keepalive_time_ms"] == 60_000 and aged["grpc.keepalive_permit_without_calls"] == 1
    # no grace given: gRPC's own default, streams on an aged connection run as long as they last
    assert "grpc.max_connection_age_grace_ms" not in dict(connection_options(ServerSettings(max_connection_age_seconds=1)))


async def test_a_stream_outlives_its_connections_maximum_age(speech):
    """Age 1 s, stream 4 s, grace 30 s: the stream gets every final result and ends OK, and the
    client's next call works (over a new connection)."""
    _, audio, _ = speech[0]
    clip = audio[:4 * 16000]
    async with running_server(max_connection_age_seconds=1.0, max_connection_age_grace_seconds=30) as (server, _):
        async with channel(f"127.0.0.1:{server.port}") as ch:
            stub = asr_pb2_grpc.SpeechRecognitionStub(ch)
            reference = await transcript(stub, clip)  # a fast stream, on the first connection
            finals, code, took = await paced(stub, clip)
            assert code == grpc.StatusCode.OK
            assert took > 3.5  # longer than the connection's age (1 s, +-10 %)
            assert " ".join(t for t in finals if t) == reference
            assert await transcript(stub, clip) == reference  # over the next connection


async def test_a_grace_shorter_than_the_stream_cuts_it(speech):
    """The counter-case: with a 0.5 s grace the aged connection is closed under the stream."""
    _, audio, _ = speech[0]
    clip = audio[:5 * 16000]
    async with running_server(max_connection_age_seconds=1.0, max_connection_age_grace_seconds=0.5) as (server, _):
        async with channel(f"127.0.0.1:{server.port}") as ch:
            finals, code, took = await paced(asr_pb2_grpc.SpeechRecognitionStub(ch), clip)
    assert code == grpc.StatusCode.UNAVAILABLE and took < 4.0, (code, took)
