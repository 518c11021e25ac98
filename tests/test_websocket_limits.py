"""The WebSocket port (--ws-port) under the gRPC port's limits, TLS and drain, each against a real
server on a real port through a plain WebSocket client: the idle timeout and --min-audio-rate,
--max-message-bytes, --max-stream-seconds, --max-streams (429), --max-streams-per-client (one quota
per token or address across both ports), TLS and mutual TLS with the gRPC port's certificate
options, and drain (503 for new connections; open streams get their final result, then a close)."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time

import grpc
import numpy as np
import pytest
import soundfile
import websockets
from websockets.exceptions import ConnectionClosed

from asr.v1 import asr_pb2
from client.stream import pcm16
from tests.conftest import SAMPLES, running_server
from tests.test_bad_input import wait_sessions_freed
from tests.test_security import pki  # noqa: F401  (the fixture)

pytestmark = pytest.mark.timeout(180)

TOKENS = ("ws-limits-token-0123456789", "ws-limits-other-token-ABCDEF")
DG_QUERY = "encoding=linear16&sample_rate=16000&interim_results=true&endpointing=false"


def speech_pcm(seconds: float) -> bytes:
    """``seconds`` of the bundled samples, back to back, as 16 kHz LINEAR16."""
    pieces = [soundfile.read(w, dtype="float32")[0] for w in sorted(SAMPLES.glob("*.wav"))]
    audio = np.concatenate(pieces)
    while len(audio) < seconds * 16000:
        audio = np.concatenate([audio, audio])
    return pcm16(audio[:int(seconds * 16000)])


def ws_url(srv, path: str, query: str = "", scheme: str = "ws") -> str:
    return f"{scheme}://127.0.0.1:{srv.ws_port}{path}" + (f"?{query}" if query else "")


async def messages_until_closed(ws, timeout: float = 30.0) -> tuple[list[dict], int | None, float]:
    """Every JSON message until the server closes: (messages, close code, when it closed)."""
    out = []
    try:
        async with asyncio.timeout(timeout):
            async for message in ws:
                out.append(json.loads(message))
    except ConnectionClosed:
        pass
    return out, ws.close_code, time.monotonic()


async def refused_status(url: str, headers: dict | None = None, **kwargs) -> websockets.InvalidStatus:
    with pytest.raises(websockets.InvalidStatus) as info:
        async with websockets.connect(url, additional_headers=headers or {}, **kwargs):
            pass
    return info.value


def finals(messages: list[dict]) -> list[dict]:
    return [m for m in messages if m.get("type") == "Results" and m["is_final"]]


async def held_grpc_stream(stub, metadata=None):
    """An asr.v1 stream with its config sent (the server has admitted it once the call is open)."""
    call = stub.StreamingRecognize(metadata=metadata)
    await call.write(asr_pb2.StreamingRecognizeRequest(streaming_config=asr_pb2.StreamingRecognitionConfig(
        config=asr_pb2.RecognitionConfig(encoding=asr_pb2.LINEAR16, sample_rate_hertz=16000))))
    return call


async def until_active(srv, n: int) -> None:
    for _ in range(250):
        if srv.active_sessions == n:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{srv.active_sessions} sessions, expected {n}")


# --- idle timeout, --min-audio-rate, --max-message-bytes, --max-stream-seconds, per address ----------
@pytest.fixture(scope="module")
async def limited():
    async with running_server(ws_port=0, idle_timeout_seconds=2.0, min_audio_rate=0.5, max_message_bytes=8192,
                              max_stream_seconds=2.0, max_streams_per_client=3) as pair:
        yield pair


async def test_an_idle_deepgram_stream_gets_its_final_result_then_an_error(limited):
    srv, _ = limited
    async with websockets.connect(ws_url(srv, "/v1/listen", DG_QUERY)) as ws:
        pcm = speech_pcm(1.0)
        for i in range(0, len(pcm), 6400):
            await ws.send(pcm[i:i + 6400])
        sent = time.monotonic()
        messages, code, closed = await messages_until_closed(ws)
    assert len(finals(messages)) == 1 and finals(messages)[0]["channel"]["alternatives"][0]["transcript"]
    assert messages[-1]["type"] == "Error" and messages[-1]["code"] == "OUT_OF_RANGE"
    assert "--idle-timeout-seconds" in messages[-1]["description"]
    assert messages.index(finals(messages)[0]) < len(messages) - 1  # the final before the error
    assert code == 1008
    assert 1.5 < closed - sent < 6, closed - sent
    await wait_sessions_freed(srv)


async def test_a_silent_openai_connection_is_closed_at_the_idle_timeout(limited):
    srv, _ = limited
    opened = time.monotonic()
    async with websockets.connect(ws_url(srv, "/v1/realtime")) as ws:
        messages, code, closed = await messages_until_closed(ws)
    assert [m["type"] for m in messages] == ["session.created", "error"]
    assert messages[-1]["error"]["code"] == "out_of_range"
    assert code == 1008 and 1.5 < closed - opened < 6
    await wait_sessions_freed(srv)


async def test_audio_trickled_slower_than_min_audio_rate_ends_the_stream(limited):
    """0.1 s of audio every 0.5 s (a fifth of real time, under --min-audio-rate 0.5): each message
    buys 0.2 s of waiting while 0.5 s pass, so the 2 s credit runs out while the client still sends."""
    srv, _ = limited
    pcm = speech_pcm(2.0)
    async with websockets.connect(ws_url(srv, "/v1/listen", DG_QUERY)) as ws:
        opened = time.monotonic()

        pieces = [pcm[i:i + 3200] for i in range(0, len(pcm), 3200)]
        sent = 0

        async def trickle():
            nonlocal sent
            for piece in pieces:
                try:
                    await ws.send(piece)
                except ConnectionClosed:  # the server closed between two pieces
                    return
                sent += 1
                await asyncio.sleep(0.5)

        sender = asyncio.create_task(trickle())
        messages, code, closed = await messages_until_closed(ws)
        sender.cancel()
    # the credit runs out about 3.4 s in, after 7 of the 20 pieces
    assert sent < len(pieces), "the stream should end while audio still comes"
    assert messages[-1]["type"] == "Error" and messages[-1]["code"] == "OUT_OF_RANGE"
    assert len(finals(messages)) == 1 and code == 1008
    assert 2.5 < closed - opened < 8, closed - opened
    await wait_sessions_freed(srv)


async def test_a_message_over_max_message_bytes_gets_the_protocols_error(limited):
    """Over --max-message-bytes (8192 here): Deepgram's Error message and OpenAI's error event,
    each counted, then close 1013; far over (past twice the limit) the WebSocket layer closes with
    1009 before the message is read, counted the same."""
    srv, _ = limited
    get = srv.metrics.registry.get_sample_value
    before = get("asr_limit_hits_total", {"reason": "max_message_bytes"}) or 0
    async with websockets.connect(ws_url(srv, "/v1/listen", DG_QUERY)) as ws:
        await ws.send(b"\0" * 16000)
        messages, code, _ = await messages_until_closed(ws)
    assert [m["type"] for m in messages] == ["Error"] and messages[0]["code"] == "RESOURCE_EXHAUSTED"
    assert "--max-message-bytes" in messages[0]["description"] and code == 1013
    async with websockets.connect(ws_url(srv, "/v1/realtime")) as ws:
        await ws.recv()
        audio = base64.b64encode(b"\0" * 12000).decode()
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
        messages, code, _ = await messages_until_closed(ws)
    assert [m["type"] for m in messages] == ["error"] and "--max-message-bytes" in messages[0]["error"]["message"]
    assert code == 1013
    assert get("asr_limit_hits_total", {"reason": "max_message_bytes"}) == before + 2
    async with websockets.connect(ws_url(srv, "/v1/listen", DG_QUERY)) as ws:
        await ws.send(b"\0" * 40000)
        messages, code, _ = await messages_until_closed(ws)
    assert messages == [] and code == 1009
    for _ in range(100):  # counted once the server has read its own close
        if get("asr_limit_hits_total", {"reason": "max_message_bytes"}) == before + 3:
            break
        await asyncio.sleep(0.02)
    assert get("asr_limit_hits_total", {"reason": "max_message_bytes"}) == before + 3
    async with websockets.connect(ws_url(srv, "/v1/listen", DG_QUERY)) as ws:  # a message at the limit is fine
        await ws.send(b"\0" * 8192)
        await ws.send(json.dumps({"type": "CloseStream"}))
        messages, code, _ = await messages_until_closed(ws)
    assert messages[-1]["type"] == "Metadata" and code == 1000
    await wait_sessions_freed(srv)


async def test_max_stream_seconds_gives_the_final_result_of_the_first_seconds(limited):
    srv, _ = limited
    pcm = speech_pcm(3.0)
    async with websockets.connect(ws_url(srv, "/v1/listen", DG_QUERY)) as ws:
        for i in range(0, len(pcm), 6400):
            await ws.send(pcm[i:i + 6400])
        messages, code, _ = await messages_until_closed(ws)
    final = finals(messages)
    assert len(final) == 1 and final[0]["start"] + final[0]["duration"] <= 2.0 + 1e-3
    assert messages[-1]["type"] == "Error" and messages[-1]["code"] == "OUT_OF_RANGE"
    assert "--max-stream-seconds" in messages[-1]["description"] and code == 1008
    async with websockets.connect(ws_url(srv, "/v1/realtime")) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {
            "input": {"format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": None}}}}))
        for i in range(0, len(pcm), 6400):
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": base64.b64encode(pcm[i:i + 6400]).decode()}))
        messages, code, _ = await messages_until_closed(ws)
    kinds = [m["type"] for m in messages]
    assert "conversation.item.input_audio_transcription.completed" in kinds and kinds[-1] == "error"
    assert kinds.index("conversation.item.input_audio_transcription.completed") < len(kinds) - 1
    assert "--max-stream-seconds" in messages[-1]["error"]["message"] and code == 1008
    await wait_sessions_freed(srv)


async def test_streams_per_address_are_one_quota_across_grpc_and_websocket(limited):
    """--max-streams-per-client 3, no tokens: two WebSocket connections and one gRPC stream from
    127.0.0.1 fill the address's quota; a fourth stream is refused on either port."""
    srv, stub = limited
    held = [await websockets.connect(ws_url(srv, "/v1/listen", DG_QUERY)),
            await websockets.connect(ws_url(srv, "/v1/realtime"))]
    call = await held_grpc_stream(stub)
    try:
        await until_active(srv, 3)
        refused = await refused_status(ws_url(srv, "/v1/listen", DG_QUERY))
        assert refused.response.status_code == 429
        assert "--max-streams-per-client" in json.loads(refused.response.body)["err_msg"]
        refused = await refused_status(ws_url(srv, "/v1/realtime"))
        assert refused.response.status_code == 429
        assert "--max-streams-per-client" in json.loads(refused.response.body)["error"]["message"]
        extra = await held_grpc_stream(stub)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await extra.read()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        await held.pop().close()  # a place freed on one port is a place on the other
        await until_active(srv, 2)
        again = await held_grpc_stream(stub)
        await until_active(srv, 3)
        again.cancel()
    finally:
        call.cancel()
        for ws in held:
            await ws.close()
    await wait_sessions_freed(srv)


# --- --max-streams ----------------------------------------------------------------------------------
async def test_max_streams_refuses_with_429_on_both_paths_and_counts_grpc_streams():
    async with running_server(ws_port=0, max_streams=1) as (srv, stub):
        async with websockets.connect(ws_url(srv, "/v1/listen", DG_QUERY)):
            await until_active(srv, 1)
            for path, query in (("/v1/listen", DG_QUERY), ("/v1/realtime", "")):
                refused = await refused_status(ws_url(srv, path, query))
                assert refused.response.status_code == 429, path
                assert "--max-streams" in refused.response.body.decode()
            call = await held_grpc_stream(stub)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call.read()
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        await until_active(srv, 0)
        call = await held_grpc_stream(stub)  # a gRPC stream holds the place: the WebSocket port is refused
        await until_active(srv, 1)
        refused = await refused_status(ws_url(srv, "/v1/realtime"))
        assert refused.response.status_code == 429
        call.cancel()
        await until_active(srv, 0)
        async with websockets.connect(ws_url(srv, "/v1/realtime")) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
        get = srv.metrics.registry.get_sample_value
        assert get("asr_limit_hits_total", {"reason": "max_streams"}) == 4
        assert get("asr_streams_total", {"api": "deepgram", "outcome": "rejected"}) == 1
        assert get("asr_streams_total", {"api": "openai", "outcome": "rejected"}) == 2
        await wait_sessions_freed(srv)


# --- TLS, mutual TLS, tokens ------------------------------------------------------------------------
def client_context(pki, client: str | None = None) -> ssl.SSLContext:
    files, paths = pki
    context = ssl.create_default_context(cadata=files["ca"].cert.decode())
    if client is not None:
        context.load_cert_chain(*paths[client])
    return context


async def deepgram_over(url: str, pcm: bytes, **kwargs) -> list[dict]:
    async with websockets.connect(url, **kwargs) as ws:
        for i in range(0, len(pcm), 6400):
            await ws.send(pcm[i:i + 6400])
        await ws.send(json.dumps({"type": "CloseStream"}))
        messages, code, _ = await messages_until_closed(ws)
    assert code == 1000
    return messages


async def test_tls_with_tokens_one_quota_per_token_whatever_the_scheme(pki):
    """--tls-cert / --tls-key serve wss:// on the WebSocket port (plain ws:// is refused);
    --max-streams-per-client 1 with --auth-token-file charges a token, not a scheme or a port:
    Deepgram's "Token" and OpenAI's "Bearer" with one token, or gRPC with it, share one place."""
    files, paths = pki
    tokens = paths["server"][0].parent / "ws-tokens"
    tokens.write_text("\n".join(TOKENS) + "\n")
    async with running_server(ws_port=0, tls_cert=paths["server"][0], tls_key=paths["server"][1],
                              auth_token_file=tokens, max_streams_per_client=1) as (srv, _):
        tls = client_context(pki)
        messages = await deepgram_over(ws_url(srv, "/v1/listen", DG_QUERY, "wss"), speech_pcm(1.0), ssl=tls,
                                       additional_headers={"Authorization": f"Token {TOKENS[0]}"})
        assert finals(messages)[0]["channel"]["alternatives"][0]["transcript"]
        assert messages[-1]["type"] == "Metadata"
        with pytest.raises((ConnectionClosed, websockets.InvalidMessage, OSError)):
            async with websockets.connect(ws_url(srv, "/v1/listen", DG_QUERY), open_timeout=5) as ws:
                await ws.recv()
        held = await websockets.connect(ws_url(srv, "/v1/listen", DG_QUERY, "wss"), ssl=tls,
                                        additional_headers={"Authorization": f"Token {TOKENS[0]}"})
        try:
            await until_active(srv, 1)
            refused = await refused_status(ws_url(srv, "/v1/realtime", scheme="wss"), ssl=tls,
                                           headers={"Authorization": f"Bearer {TOKENS[0]}"})
            assert refused.response.status_code == 429
            async with grpc.aio.secure_channel(f"127.0.0.1:{srv.port}", grpc.composite_channel_credentials(
                    grpc.ssl_channel_credentials(files["ca"].cert),
                    grpc.access_token_call_credentials(TOKENS[0]))) as channel:
                from asr.v1 import asr_pb2_grpc
                call = await held_grpc_stream(asr_pb2_grpc.SpeechRecognitionStub(channel))
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call.read()
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "--max-streams-per-client" in info.value.details()
            async with websockets.connect(ws_url(srv, "/v1/realtime", scheme="wss"), ssl=tls,  # its own quota
                                          additional_headers={"Authorization": f"Bearer {TOKENS[1]}"}) as ws:
                assert json.loads(await ws.recv())["type"] == "session.created"
        finally:
            await held.close()
        await wait_sessions_freed(srv)


async def test_mutual_tls_needs_a_client_certificate_from_the_ca(pki):
    files, paths = pki
    async with running_server(ws_port=0, tls_cert=paths["server"][0], tls_key=paths["server"][1],
                              tls_client_ca=paths["ca"][0]) as (srv, _):
        url = ws_url(srv, "/v1/listen", DG_QUERY, "wss")
        messages = await deepgram_over(url, speech_pcm(1.0), ssl=client_context(pki, "client"))
        assert messages[-1]["type"] == "Metadata" and len(finals(messages)) == 1
        for client in (None, "rogue"):
            with pytest.raises((ssl.SSLError, ConnectionError, ConnectionClosed, websockets.InvalidMessage)):
                async with websockets.connect(url, ssl=client_context(pki, client), open_timeout=5) as ws:
                    await ws.send(b"\0" * 3200)
                    await ws.recv()
        await wait_sessions_freed(srv)


# --- drain ------------------------------------------------------------------------------------------
async def test_drain_refuses_new_connections_and_ends_open_streams_after_their_final_result():
    """AsrServer.drain (the SIGTERM path): new connections get 503 on both paths; a Deepgram and an
    OpenAI stream still sending at --drain-timeout get their final result, then the protocol's
    error (UNAVAILABLE) and close 1001."""
    async with running_server(ws_port=0) as (srv, _):
        pcm = speech_pcm(30.0)

        async def realtime(ws, wrap):
            for i in range(0, len(pcm), 5120):
                await ws.send(wrap(pcm[i:i + 5120]))
                await asyncio.sleep(0.16)

        dg = await websockets.connect(ws_url(srv, "/v1/listen", DG_QUERY))
        oa = await websockets.connect(ws_url(srv, "/v1/realtime"))
        assert json.loads(await oa.recv())["type"] == "session.created"
        await oa.send(json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {
            "input": {"format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": None}}}}))
        senders = [asyncio.create_task(realtime(dg, bytes)),
                   asyncio.create_task(realtime(oa, lambda b: json.dumps(
                       {"type": "input_audio_buffer.append", "audio": base64.b64encode(b).decode()})))]
        collected = [asyncio.create_task(messages_until_closed(ws, 60)) for ws in (dg, oa)]
        await asyncio.sleep(1.5)  # both streams have audio in recognition
        assert srv.active_sessions == 2
        drain = asyncio.create_task(srv.drain(1.0))
        await asyncio.sleep(0.2)
        for path, query in (("/v1/listen", DG_QUERY), ("/v1/realtime", "")):
            refused = await refused_status(ws_url(srv, path, query))
            assert refused.response.status_code == 503, path
        assert await drain is False  # the streams were still sending at the timeout
        (dg_messages, dg_code, _), (oa_messages, oa_code, _) = await asyncio.gather(*collected)
        for task in senders:
            task.cancel()
        assert finals(dg_messages) and finals(dg_messages)[-1]["channel"]["alternatives"][0]["transcript"]
        assert dg_messages[-1]["type"] == "Error" and dg_messages[-1]["code"] == "UNAVAILABLE"
        assert "shutting down" in dg_messages[-1]["description"] and dg_code == 1001
        kinds = [m["type"] for m in oa_messages]
        assert kinds[-2:] == ["conversation.item.input_audio_transcription.completed", "error"], kinds
        assert oa_messages[-2]["transcript"] and oa_messages[-1]["error"]["code"] == "unavailable"
        assert oa_code == 1001
        assert srv.active_sessions == 0
