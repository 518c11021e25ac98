"""Browsers on the WebSocket port (--ws-port), against real servers on real ports: the vendors' token
grants through their unmodified SDKs (Deepgram's POST /v1/auth/grant, OpenAI's ephemeral client
secret), tokens and API keys in Sec-WebSocket-Protocol as browsers send them, single use and expiry,
the Origin allow-list, a browser page's message limits, and the page itself served by the server,
in headless Chromium with a fake microphone: a transcript arrives, and a wrong origin, an expired
token, a reused token and no token are each refused with a clear error."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket

import pytest
import websockets
from aiohttp import web as aioweb
from deepgram.core.api_error import ApiError
from openai import AsyncOpenAI
from websockets.datastructures import Headers

from asr.v1 import asr_pb2_grpc
from client.connection import Connection
from client.stream import channel, pcm16
from server.api.browser import OriginPolicy
from server.model.loading import load_demo
from tests.browser import chromium_page, count_sent_audio, padded_wav, stream_from_microphone
from tests.conftest import SAMPLES, running_server
from tests.test_bad_input import wait_sessions_freed
from tests.test_websocket import WAVS, asr_v1_finals, deepgram_client, deepgram_messages, load

pytestmark = pytest.mark.timeout(180)

KEY = "browser-test-key-0123456789"
DG_QUERY = "encoding=linear16&sample_rate=16000&interim_results=true"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def other_origin_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
async def server(tmp_path_factory, other_origin_port):
    keys = tmp_path_factory.mktemp("keys") / "tokens"
    keys.write_text(KEY + "\n")
    async with running_server(ws_port=0, auth_token_file=keys, ws_token_ttl_seconds=30,
                              ws_allow_origin=[f"http://127.0.0.1:{other_origin_port}"],
                              ws_browser_max_message_bytes=16384, ws_browser_max_messages_per_second=20) as pair:
        yield pair


async def keyed_finals(srv, audio) -> list[str]:
    """asr.v1's endpointed final transcripts of ``audio`` (16 kHz), through the gRPC port with the key."""
    async with channel(Connection(f"127.0.0.1:{srv.port}", token=KEY)) as ch:
        return await asr_v1_finals(asr_pb2_grpc.SpeechRecognitionStub(ch), audio, 16000, endpointing=True)


def url(srv, path: str, query: str = "") -> str:
    return f"ws://127.0.0.1:{srv.ws_port}{path}" + (f"?{query}" if query else "")


async def refused(target: str, **kwargs) -> websockets.InvalidStatus:
    with pytest.raises(websockets.InvalidStatus) as info:
        async with websockets.connect(target, **kwargs):
            pass
    return info.value


async def deepgram_over(ws, pcm: bytes) -> list[dict]:
    for i in range(0, len(pcm), 6400):
        await ws.send(pcm[i:i + 6400])
    await ws.send(json.dumps({"type": "CloseStream"}))
    return [json.loads(m) async for m in ws]


async def all_messages(ws) -> list[dict]:
    """Every JSON message until the server closes (however it closes)."""
    messages = []
    with contextlib.suppress(websockets.ConnectionClosed):
        async with asyncio.timeout(30):
            while True:
                messages.append(json.loads(await ws.recv()))
    return messages


async def closed_with_error(ws) -> tuple[dict, int, str]:
    """The one message a refused browser connection gets, its close code and reason."""
    messages = await all_messages(ws)
    assert len(messages) == 1, messages
    return messages[0], ws.close_code, ws.close_reason


def limit_hits(srv, reason: str) -> float:
    return srv.metrics.registry.get_sample_value("asr_limit_hits_total", {"reason": reason}) or 0.0


# --- Deepgram: POST /v1/auth/grant and Sec-WebSocket-Protocol ---------------------------------------
async def test_deepgram_sdk_grant_opens_one_connection_with_the_asr_v1_finals(server):
    srv, _ = server
    audio = load(WAVS[0], 16000)
    want = await keyed_finals(srv, audio)
    granted = await deepgram_client(srv, api_key=KEY).auth.v1.tokens.grant(ttl_seconds=20)
    assert granted.expires_in == 20 and granted.access_token.startswith("asrg1.")
    assert KEY not in granted.access_token
    auth = {"access_token": granted.access_token}  # the SDK sends it as "Authorization: Bearer <token>"
    messages = await deepgram_messages(srv, pcm16(audio), auth=auth, encoding="linear16", sample_rate=16000)
    finals = [m for m in messages if getattr(m, "type", None) == "Results" and m.is_final]
    assert [m.channel.alternatives[0].transcript for m in finals] == want
    with pytest.raises(ApiError) as info:  # single use
        await deepgram_messages(srv, b"\0" * 3200, auth=auth, encoding="linear16", sample_rate=16000)
    assert info.value.status_code == 401
    with pytest.raises(ApiError) as info:  # only an API key mints tokens
        await deepgram_client(srv, access_token=granted.access_token).auth.v1.tokens.grant()
    assert info.value.status_code == 401
    with pytest.raises(ApiError) as info:
        await deepgram_client(srv, api_key="wrong-key-0123456789").auth.v1.tokens.grant()
    assert info.value.status_code == 401
    with pytest.raises(ApiError) as info:  # longer than --ws-token-ttl-seconds
        await deepgram_client(srv, api_key=KEY).auth.v1.tokens.grant(ttl_seconds=3600)
    assert info.value.status_code == 400 and "ttl_seconds" in json.dumps(info.value.body)
    await wait_sessions_freed(srv)


async def test_deepgram_api_key_and_grant_in_sec_websocket_protocol(server):
    """As a browser sends them (new WebSocket(url, ["token", KEY]) / ["bearer", token]): the
    server answers the subprotocol and streams; a wrong key or a used token gets 401."""
    srv, _ = server
    audio = load(WAVS[1], 16000)
    want = await keyed_finals(srv, audio)
    async with websockets.connect(url(srv, "/v1/listen", DG_QUERY), subprotocols=["token", KEY]) as ws:
        assert ws.subprotocol == "token"
        messages = await deepgram_over(ws, pcm16(audio))
    finals = [m for m in messages if m["type"] == "Results" and m["is_final"]]
    assert [m["channel"]["alternatives"][0]["transcript"] for m in finals] == want
    assert messages[-1]["type"] == "Metadata"
    assert (await refused(url(srv, "/v1/listen", DG_QUERY), subprotocols=["token", "wrong-key-0123456789"])
            ).response.status_code == 401
    token = (await deepgram_client(srv, api_key=KEY).auth.v1.tokens.grant()).access_token
    async with websockets.connect(url(srv, "/v1/listen", DG_QUERY), subprotocols=["bearer", token]) as ws:
        assert ws.subprotocol == "bearer"
        assert (await deepgram_over(ws, b"\0" * 6400))[-1]["type"] == "Metadata"
    response = (await refused(url(srv, "/v1/listen", DG_QUERY), subprotocols=["bearer", token])).response
    assert response.status_code == 401 and "already used" in json.loads(response.body)["err_msg"]
    await wait_sessions_freed(srv)


# --- OpenAI: ephemeral client secret -------------------------------------------------------------
async def test_openai_client_secret_through_the_sdk_and_the_browser_subprotocol(server):
    srv, _ = server
    api = AsyncOpenAI(api_key=KEY, base_url=f"http://127.0.0.1:{srv.ws_port}/v1", max_retries=0)
    created = await api.beta.realtime.transcription_sessions.create(
        input_audio_format="pcm16", input_audio_transcription={"model": "gpt-4o-transcribe", "language": "en"},
        client_secret={"expires_at": {"anchor": "created_at", "seconds": 20}})
    secret = created.client_secret.value
    assert secret.startswith("asrg1.") and created.client_secret.expires_at > 0
    # the SDK with the secret as its key (Authorization: Bearer <secret>)
    ephemeral = AsyncOpenAI(api_key=secret, websocket_base_url=f"ws://127.0.0.1:{srv.ws_port}/v1", max_retries=0)
    async with ephemeral.realtime.connect() as conn:
        assert (await conn.recv()).type == "session.created"
    # a browser: new WebSocket(url, ["realtime", "openai-insecure-api-key." + secret])
    second = (await api.beta.realtime.transcription_sessions.create()).client_secret.value
    offered = ["realtime", f"openai-insecure-api-key.{second}"]
    async with websockets.connect(url(srv, "/v1/realtime"), subprotocols=offered) as ws:
        assert ws.subprotocol == "realtime"
        assert json.loads(await ws.recv())["type"] == "session.created"
        audio = base64.b64encode(pcm16(load(WAVS[0], 24000))[:48000]).decode()
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        async with asyncio.timeout(30):
            while json.loads(await ws.recv())["type"] != "conversation.item.input_audio_transcription.completed":
                pass
    response = (await refused(url(srv, "/v1/realtime"), subprotocols=offered)).response
    assert response.status_code == 401 and "already used" in json.loads(response.body)["error"]["message"]
    # single purpose: an OpenAI secret does not open a Deepgram connection
    third = (await api.beta.realtime.transcription_sessions.create()).client_secret.value
    response = (await refused(url(srv, "/v1/listen", DG_QUERY), subprotocols=["bearer", third])).response
    assert response.status_code == 401 and "minted for openai" in json.loads(response.body)["err_msg"]
    with pytest.raises(Exception) as info:
        await api.beta.realtime.transcription_sessions.create(input_audio_format="g711_ulaw")
    assert "input_audio_format" in str(info.value)
    await wait_sessions_freed(srv)


# --- origins and a browser page's limits ----------------------------------------------------------
def test_the_servers_own_origin_passes_only_by_ip_address_localhost_or_a_listed_host():
    policy = OriginPolicy(["https://app.example"], tls=False)

    def refusal(origin: str | None, host: str) -> str | None:
        return policy.refusal(Headers({"Host": host, **({"Origin": origin} if origin else {})}))

    assert refusal("http://127.0.0.1:8000", "127.0.0.1:8000") is None
    assert refusal("http://[::1]:8000", "[::1]:8000") is None
    assert refusal("http://localhost:8000", "localhost:8000") is None
    assert refusal("https://app.example", "asr.internal:8000") is None  # listed
    assert refusal("http://app.example:8000", "app.example:8000") is None  # the page by a listed host's name
    assert "may not use" in refusal("http://rebound.example:8000", "rebound.example:8000")  # DNS rebinding
    assert "may not use" in refusal("http://127.0.0.1:9000", "127.0.0.1:8000")  # another port
    assert "may not use" in refusal("https://127.0.0.1:8000", "127.0.0.1:8000")  # another scheme
    assert "may not use" in refusal("null", "127.0.0.1:8000")
    assert refusal(None, "anything") is None  # no Origin: not a browser page


async def test_origins_outside_the_allow_list_are_refused_with_a_clear_error(server, other_origin_port):
    """A connection with an Origin (a browser page) from an origin not listed in
    --ws-allow-origin: accepted only to get Deepgram's Error message and a close frame naming the
    reason (a browser sees no HTTP status); counted; no stream is opened. Listed: it streams. A
    token request from such an origin gets 403."""
    srv, _ = server
    before = limit_hits(srv, "auth")
    async with websockets.connect(url(srv, "/v1/listen", DG_QUERY), subprotocols=["token", KEY],
                                  origin="http://evil.example") as ws:
        message, code, reason = await closed_with_error(ws)
    assert message["type"] == "Error" and message["code"] == "UNAUTHENTICATED"
    assert "'http://evil.example' may not use" in message["description"] and "--ws-allow-origin" in message["description"]
    assert code == 1008 and "may not use" in reason
    assert limit_hits(srv, "auth") == before + 1 and srv.active_sessions == 0
    async with websockets.connect(url(srv, "/v1/listen", DG_QUERY), subprotocols=["token", KEY],
                                  origin=f"http://127.0.0.1:{other_origin_port}") as ws:
        assert (await deepgram_over(ws, b"\0" * 6400))[-1]["type"] == "Metadata"
    async with websockets.connect(url(srv, "/v1/realtime"), origin="http://evil.example") as ws:  # OpenAI's error
        message, code, _ = await closed_with_error(ws)
    assert message["type"] == "error" and "may not use" in message["error"]["message"] and code == 1008
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.ws_port)
    writer.write(f"POST /v1/auth/grant HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://evil.example\r\n"
                 f"Authorization: Token {KEY}\r\nContent-Length: 2\r\n\r\n{{}}".encode())
    status = (await reader.read()).split(b"\r\n", 1)[0]
    writer.close()
    assert status == b"HTTP/1.1 403 Forbidden"
    await wait_sessions_freed(srv)


async def test_a_browser_pages_messages_have_their_own_size_and_rate_limits(server, other_origin_port):
    srv, _ = server
    origin = f"http://127.0.0.1:{other_origin_port}"
    size_hits, rate_hits = limit_hits(srv, "max_message_bytes"), limit_hits(srv, "max_messages_per_second")
    async with websockets.connect(url(srv, "/v1/listen", DG_QUERY), subprotocols=["token", KEY], origin=origin) as ws:
        await ws.send(b"\0" * 20000)  # over --ws-browser-max-message-bytes (16384), under --max-message-bytes
        message, code, _ = await closed_with_error(ws)
    assert message["code"] == "RESOURCE_EXHAUSTED" and "--ws-browser-max-message-bytes" in message["description"]
    assert code == 1013 and limit_hits(srv, "max_message_bytes") == size_hits + 1
    async with websockets.connect(url(srv, "/v1/listen", DG_QUERY), subprotocols=["token", KEY], origin=origin) as ws:
        for _ in range(60):  # 20 a second allowed, a second's worth at once
            await ws.send(b"\0" * 320)
        messages = await all_messages(ws)
    assert messages[-1]["type"] == "Error" and "--ws-browser-max-messages-per-second" in messages[-1]["description"]
    assert ws.close_code == 1013 and limit_hits(srv, "max_messages_per_second") == rate_hits + 1
    async with websockets.connect(url(srv, "/v1/listen", DG_QUERY), subprotocols=["token", KEY]) as ws:
        await ws.send(b"\0" * 20000)  # no Origin: not a browser page, the port's own limits
        assert (await deepgram_over(ws, b""))[-1]["type"] == "Metadata"
    await wait_sessions_freed(srv)


# --- the page, served by the server, in headless Chromium ------------------------------------------
@contextlib.asynccontextmanager
async def other_origin(port: int):
    """A blank page at http://127.0.0.1:PORT and http://localhost:PORT (two origins)."""
    async def blank(_):
        return aioweb.Response(text="<!doctype html><title>other</title>", content_type="text/html")

    app = aioweb.Application()
    app.router.add_get("/", blank)
    runner = aioweb.AppRunner(app, access_log=None)
    await runner.setup()
    site = aioweb.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield
    finally:
        await runner.cleanup()


OPEN_JS = """async ([url, protocols]) => {
  const ws = protocols ? new WebSocket(url, protocols) : new WebSocket(url);
  const messages = [];
  ws.onmessage = (e) => messages.push(JSON.parse(e.data));
  const close = await new Promise((resolve) => { ws.onclose = (e) => resolve([e.code, e.reason]); });
  return {messages, code: close[0], reason: close[1], protocol: ws.protocol};
}"""


async def test_the_page_served_by_the_server_transcribes_and_refusals_are_clear(tmp_path, other_origin_port):
    sample = sorted(SAMPLES.glob("*.wav"))[0]
    wav = tmp_path / "microphone.wav"
    seconds = padded_wav(sample, wav)
    keys = tmp_path / "tokens"
    keys.write_text(KEY + "\n")
    async with running_server(model=load_demo(), ws_port=0, auth_token_file=keys, ws_token_ttl_seconds=30,
                              ws_allow_origin=[f"http://127.0.0.1:{other_origin_port}"]) as (srv, _), \
            other_origin(other_origin_port), chromium_page(wav) as page:
        sent = count_sent_audio(page)
        base = f"http://127.0.0.1:{srv.ws_port}"
        await page.goto(base + "/")
        await page.wait_for_function("document.body.dataset.backend")
        assert await page.text_content("#backend") == "Server: demo (fp32, cpu), reachable."
        assert await page.is_visible("#key") and not await page.is_visible("#decoding")
        # no key typed: the page says what is missing
        await page.click("#toggle")
        await page.wait_for_function("document.body.dataset.state === 'error'")
        assert "needs an API key" in await page.text_content("#status")
        await page.fill("#key", KEY)
        await stream_from_microphone(page, sent, seconds - 0.8, timeout_s=60)
        assert await page.evaluate("document.body.dataset.state") == "done", await page.text_content("#status")
        finals = await page.locator("#finals li .text").all_text_contents()
        assert finals and finals[0] == sample.with_suffix(".txt").read_text().strip(), finals
        assert "after its audio was sent" in await page.text_content("#stats")

        # refusals as the page's own WebSocket would see them: one Error message, close 1008 + reason
        listen = f"ws://127.0.0.1:{srv.ws_port}/v1/listen?{DG_QUERY}"

        async def grant(ttl: int = 30) -> str:
            return (await deepgram_client(srv, api_key=KEY).auth.v1.tokens.grant(ttl_seconds=ttl)).access_token

        def refusal(result: dict, words: str) -> None:
            assert result["code"] == 1008 and words in result["reason"], result
            assert [m["type"] for m in result["messages"]] == ["Error"], result
            assert words in result["messages"][0]["description"], result

        refusal(await page.evaluate(OPEN_JS, [listen, None]), "missing credentials")
        expired = await grant(ttl=1)
        await asyncio.sleep(1.5)
        refusal(await page.evaluate(OPEN_JS, [listen, ["bearer", expired]]), "the token expired")
        token = await grant()
        first = await page.evaluate("""([url, token]) => new Promise((resolve) => {
          const ws = new WebSocket(url, ['bearer', token]);
          ws.onopen = () => { ws.send(JSON.stringify({type: 'CloseStream'})); };
          ws.onclose = (e) => resolve([e.code, ws.protocol]);
        })""", [listen, token])
        assert first == [1000, "bearer"], first
        refusal(await page.evaluate(OPEN_JS, [listen, ["bearer", token]]), "already used")
        # a page of a listed origin may connect; the same page on another origin (localhost) may not
        await page.goto(f"http://127.0.0.1:{other_origin_port}/")
        allowed = await page.evaluate("""([url, token]) => new Promise((resolve) => {
          const ws = new WebSocket(url, ['bearer', token]);
          ws.onopen = () => { ws.send(JSON.stringify({type: 'CloseStream'})); };
          ws.onclose = (e) => resolve(e.code);
        })""", [listen, await grant()])
        assert allowed == 1000
        await page.goto(f"http://localhost:{other_origin_port}/")
        refusal(await page.evaluate(OPEN_JS, [listen, ["bearer", await grant()]]), "may not use")
        await wait_sessions_freed(srv)
