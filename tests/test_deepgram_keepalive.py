"""Deepgram's KeepAlive (WebSocket API, /v1/listen) against a real server on a real port, through
Deepgram's own SDK: it keeps a stream open without audio past --idle-timeout-seconds, but for at
most --ws-max-keepalive-seconds since the last audio; the first KeepAlive after that ends the stream
with the final result of its audio, then an OUT_OF_RANGE error naming the option and close code 1008
(docs/operations.md, "Trickling streams")."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from websockets.exceptions import ConnectionClosed

from tests.conftest import running_server
from tests.observability import scrape
from tests.test_bad_input import wait_sessions_freed
from tests.test_websocket import deepgram_client
from tests.test_websocket_limits import speech_pcm

pytestmark = pytest.mark.timeout(120)

IDLE_S, KEEPALIVE_S, EVERY_S = 1.0, 4.0, 0.25  # idle timeout, the KeepAlive bound, KeepAlive period


@pytest.fixture(scope="module")
async def server():
    async with running_server(ws_port=0, idle_timeout_seconds=IDLE_S, ws_max_keepalive_seconds=KEEPALIVE_S) as pair:
        yield pair


async def keepalive_only(srv, pcm: bytes) -> tuple[list, int | None, float, float]:
    """``pcm`` (may be empty), then KeepAlive every EVERY_S until the server closes: (messages,
    close code, seconds from the last audio (or the opening) to the close, KeepAlives sent)."""
    messages, sent = [], 0
    async with deepgram_client(srv).listen.v1.connect(model="nova-3", encoding="linear16", sample_rate=16000,
                                                       endpointing="false") as conn:
        for i in range(0, len(pcm), 6400):
            await conn.send_media(pcm[i:i + 6400])
        last_audio = time.monotonic()

        async def keep_alive():
            nonlocal sent
            with contextlib.suppress(ConnectionClosed):  # until the server closes
                while True:
                    await conn.send_keep_alive()
                    sent += 1
                    await asyncio.sleep(EVERY_S)

        sender = asyncio.create_task(keep_alive())
        try:
            async with asyncio.timeout(KEEPALIVE_S + 20):
                async for message in conn:  # the SDK raises on a close code other than 1000
                    messages.append(message)
        except ConnectionClosed:
            pass
        finally:
            sender.cancel()
        closed = time.monotonic()
        code = conn._websocket.close_code  # the SDK ends its iteration on the close; the frame's code
    return messages, code, closed - last_audio, sent


def limit_hits(srv) -> float:
    return scrape(srv.metrics_port).value("asr_limit_hits_total", reason="idle_timeout")


async def test_keepalive_holds_a_stream_without_audio_only_up_to_the_bound(server):
    """1 s of speech, then KeepAlive four times a second: the stream outlives the 1 s idle timeout
    (KeepAlive keeps it open), and ends about 4 s after its last audio, with the final result of
    that second of speech, then the error."""
    srv, _ = server
    hits = limit_hits(srv)
    messages, code, after_audio, sent = await keepalive_only(srv, speech_pcm(1.0))
    types = [getattr(m, "type", None) for m in messages]
    finals = [m for m in messages if getattr(m, "type", None) == "Results" and m.is_final]
    assert len(finals) == 1 and finals[0].channel.alternatives[0].transcript, types
    assert types[-1] == "Error" and types.index("Results") < len(types) - 1, types  # the final first
    error = messages[-1]
    assert error.code == "OUT_OF_RANGE" and "--ws-max-keepalive-seconds" in error.description, error
    assert code == 1008
    assert KEEPALIVE_S <= after_audio < KEEPALIVE_S + 3, after_audio  # not at the idle timeout (1 s)
    assert sent >= KEEPALIVE_S / EVERY_S - 2
    assert limit_hits(srv) == hits + 1
    await wait_sessions_freed(srv)


async def test_a_connection_of_keepalives_and_no_audio_is_closed_at_the_bound(server):
    """No audio at all, only KeepAlives: without the bound nothing would end it (each message
    resets the idle timer of a connection with no stream); it is closed about 4 s after opening."""
    srv, _ = server
    messages, code, after_open, _ = await keepalive_only(srv, b"")
    assert [getattr(m, "type", None) for m in messages] == ["Error"], messages
    assert messages[0].code == "OUT_OF_RANGE" and "--ws-max-keepalive-seconds" in messages[0].description
    assert code == 1008
    assert KEEPALIVE_S <= after_open < KEEPALIVE_S + 3, after_open
    await wait_sessions_freed(srv)


async def test_audio_resets_the_bound(server):
    """A stream that sends 0.5 s of speech every 2 s with KeepAlives between (a voice agent that
    speaks in turns) runs past the bound for as long as audio keeps coming, then ends normally."""
    srv, _ = server
    pcm = speech_pcm(0.5)
    messages = []
    async with deepgram_client(srv).listen.v1.connect(model="nova-3", encoding="linear16", sample_rate=16000,
                                                       endpointing="false") as conn:
        async def send():
            started = time.monotonic()
            while time.monotonic() - started < KEEPALIVE_S * 2:
                await conn.send_media(pcm)
                for _ in range(int(2.0 / EVERY_S)):
                    await conn.send_keep_alive()
                    await asyncio.sleep(EVERY_S)
            await conn.send_close_stream()

        sender = asyncio.create_task(send())
        async with asyncio.timeout(60):
            async for message in conn:
                messages.append(message)
        await sender
        code = conn._websocket.close_code
    types = [getattr(m, "type", None) for m in messages]
    assert "Error" not in types, messages[-1]
    assert types[-1] == "Metadata" and messages[-1].duration >= 4 * 0.5 - 0.01, types
    assert code == 1000
    await wait_sessions_freed(srv)
