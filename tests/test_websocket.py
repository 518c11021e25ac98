"""The WebSocket API (--ws-port) through the vendors' unmodified SDKs against a real server on a real
port: OpenAI Realtime transcription (``openai``) and Deepgram live streaming (``deepgram-sdk``) give
asr.v1's final transcripts for the same audio; refused fields get each protocol's own error."""

import asyncio
import base64
import json

import numpy as np

import pytest
import soundfile
import soxr
import websockets
from deepgram import AsyncDeepgramClient
from deepgram.core.api_error import ApiError
from deepgram.environment import DeepgramClientEnvironment
from openai import AsyncOpenAI

from client.stream import pcm16
from tests.conftest import SAMPLES, running_server
from tests.helpers import final_results
from tests.test_bad_input import wait_sessions_freed

WAVS = sorted(SAMPLES.glob("*.wav"))
TOKEN = "ws-test-token-0123456789"
COMPLETED = "conversation.item.input_audio_transcription.completed"


@pytest.fixture(scope="module")
async def server():
    async with running_server(ws_port=0) as pair:
        yield pair


async def asr_v1_finals(stub, audio, rate: int, endpointing: bool) -> list[str]:
    finals = await final_results(stub, audio, rate=rate, endpointing=endpointing)
    return [r.alternatives[0].transcript for r in finals if r.alternatives[0].transcript]


def load(wav, rate: int):
    audio, source_rate = soundfile.read(wav, dtype="float32")
    return soxr.resample(audio, source_rate, rate) if rate != source_rate else audio


def openai_client(srv, key=TOKEN) -> AsyncOpenAI:
    return AsyncOpenAI(api_key=key, websocket_base_url=f"ws://127.0.0.1:{srv.ws_port}/v1", max_retries=0)


async def openai_events(conn, until: int, stop=(COMPLETED,)) -> list:
    """Events until ``until`` events of a type in ``stop`` (or an error) have come."""
    events, seen = [], 0
    async for event in conn:
        events.append(event)
        if event.type in stop:
            seen += 1
        if seen >= until or event.type == "error":
            return events
    return events


async def append_all(conn, pcm: bytes, piece: int = 9600) -> None:
    for i in range(0, len(pcm), piece):
        await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i:i + piece]).decode())


# --- OpenAI Realtime -----------------------------------------------------------------------------
async def test_openai_committed_buffers_give_the_asr_v1_transcripts(server):
    """turn_detection null: each sample is appended at 24 kHz and committed; its completed
    transcript is asr.v1's for the same audio, endpointing off."""
    srv, stub = server
    async with openai_client(srv).realtime.connect() as conn:
        created = await conn.recv()
        assert created.type == "session.created" and created.session.type == "transcription"
        await conn.session.update(session={"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None,
            "transcription": {"model": "gpt-4o-transcribe", "language": "en"}}}})
        updated = await conn.recv()
        assert updated.type == "session.updated", updated
        assert updated.session.audio.input.turn_detection is None
        nonempty = 0
        for wav in WAVS:
            audio = load(wav, 24000)
            want = " ".join(await asr_v1_finals(stub, audio, 24000, endpointing=False))
            await append_all(conn, pcm16(audio))
            await conn.input_audio_buffer.commit()
            events = await openai_events(conn, 1)
            kinds = [e.type for e in events]
            # deltas stream while the audio comes (before the commit too); completed ends the item
            assert kinds.count("input_audio_buffer.committed") == 1 and kinds[-1] == COMPLETED, kinds
            item = events[-1].item_id
            assert {e.item_id for e in events} == {item}
            assert events[-1].transcript == want, wav.stem
            nonempty += bool(want)
        assert nonempty, "the model should emit text, or the comparison proves little"
    await wait_sessions_freed(srv)


@pytest.mark.slow
async def test_openai_server_vad_turns_are_the_asr_v1_endpointed_finals(server):
    """server_vad (the default): each utterance the endpointing ends is speech_started ...
    speech_stopped, committed, completed, with asr.v1's endpointed final transcripts."""
    srv, stub = server
    audio = load(WAVS[2], 24000)
    silence = np.zeros(24000, dtype=np.float32)  # a second of silence: the last utterance ends too
    audio = np.concatenate([audio, silence, audio, silence])
    want = await asr_v1_finals(stub, audio, 24000, endpointing=True)
    assert len(want) >= 2
    async with openai_client(srv).realtime.connect() as conn:
        await conn.recv()
        await append_all(conn, pcm16(audio))
        events = await openai_events(conn, len(want))
    got = [e.transcript for e in events if e.type == COMPLETED]
    assert got == want
    kinds = [e.type for e in events]
    assert kinds.count("input_audio_buffer.speech_started") == len(want)
    assert kinds.count("input_audio_buffer.speech_stopped") == len(want)
    first = [e for e in events if e.type == "input_audio_buffer.speech_stopped"][0]
    assert 0 < first.audio_end_ms <= len(audio) / 24


async def test_openai_refused_fields_get_an_error_event_naming_them(server):
    srv, _ = server
    async with openai_client(srv).realtime.connect() as conn:
        await conn.recv()
        for session, param in [
            ({"type": "transcription", "audio": {"input": {"noise_reduction": {"type": "near_field"}}}},
             "session.audio.input.noise_reduction"),
            ({"type": "transcription", "audio": {"input": {"format": {"type": "audio/pcmu"}}}},
             "session.audio.input.format.type"),
            ({"type": "transcription", "audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}},
             "session.audio.input.turn_detection.type"),
            ({"type": "transcription", "audio": {"input": {"transcription": {"language": "de"}}}},
             "session.audio.input.transcription.language"),
            ({"type": "realtime"}, "session.type"),
        ]:
            await conn.session.update(session=session, event_id="evt_1")
            event = await conn.recv()
            assert event.type == "error", event
            assert event.error.param == param and param in event.error.message
            assert event.error.type == "invalid_request_error" and event.error.event_id == "evt_1"
        await conn.input_audio_buffer.commit()  # nothing appended yet
        event = await conn.recv()
        assert event.type == "error" and event.error.code == "input_audio_buffer_commit_empty"
        # the connection still works
        await conn.session.update(session={"type": "transcription"})
        assert (await conn.recv()).type == "session.updated"
    await wait_sessions_freed(srv)


async def test_openai_clear_drops_the_buffer(server):
    srv, stub = server
    audio = load(WAVS[1], 24000)
    want = " ".join(await asr_v1_finals(stub, audio, 24000, endpointing=False))
    async with openai_client(srv).realtime.connect() as conn:
        await conn.recv()
        await conn.session.update(session={"type": "transcription", "audio": {"input": {"turn_detection": None}}})
        await conn.recv()
        await append_all(conn, pcm16(load(WAVS[0], 24000)))
        await conn.input_audio_buffer.clear()
        await append_all(conn, pcm16(audio))
        await conn.input_audio_buffer.commit()
        events = await openai_events(conn, 1)
    assert "input_audio_buffer.cleared" in [e.type for e in events]
    assert [e.transcript for e in events if e.type == COMPLETED] == [want]
    await wait_sessions_freed(srv)


async def test_bearer_tokens_are_checked_at_the_handshake(tmp_path):
    """--auth-token-file: a wrong token gets 401 on both paths; the SDKs' own headers
    (OpenAI's Bearer, Deepgram's "Token" API key and Bearer access token) with the right one work."""
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    async with running_server(ws_port=0, auth_token_file=tokens) as (srv, _):
        await _check_tokens(srv)
        get = srv.metrics.registry.get_sample_value  # counted under their own api label
        assert get("asr_streams_total", {"api": "openai", "outcome": "rejected"}) >= 2
        assert get("asr_streams_total", {"api": "deepgram", "outcome": "rejected"}) >= 1
        assert get("asr_streams_total", {"api": "deepgram", "outcome": "ok"}) >= 2


async def _check_tokens(srv):
    for path in ("/v1/realtime", "/v1/listen"):
        with pytest.raises(websockets.InvalidStatus) as info:
            async with websockets.connect(f"ws://127.0.0.1:{srv.ws_port}{path}",
                                          additional_headers={"Authorization": "Bearer wrong-token-0123456789"}):
                pass
        assert info.value.response.status_code == 401
    with pytest.raises(Exception):
        async with openai_client(srv, key="wrong-token-0123456789").realtime.connect() as conn:
            await conn.recv()
    async with openai_client(srv).realtime.connect() as conn:
        assert (await conn.recv()).type == "session.created"
    for auth in ({"api_key": TOKEN}, {"access_token": TOKEN}):
        messages = await deepgram_messages(srv, b"\0" * 3200, auth=auth, encoding="linear16", sample_rate=16000)
        assert messages[-1].type == "Metadata"


# --- Deepgram -----------------------------------------------------------------------------------
def deepgram_client(srv, **auth) -> AsyncDeepgramClient:
    url = f"127.0.0.1:{srv.ws_port}"
    env = DeepgramClientEnvironment(base=f"http://{url}", production=f"ws://{url}", agent=f"ws://{url}",
                                    agent_rest=f"http://{url}")
    return AsyncDeepgramClient(environment=env, **(auth or {"api_key": TOKEN}))


async def deepgram_messages(srv, pcm: bytes, finalize=False, auth=None, **params) -> list:
    messages = []
    async with deepgram_client(srv, **(auth or {})).listen.v1.connect(model="nova-3", **params) as conn:
        async def send():
            for i in range(0, len(pcm), 6400):
                await conn.send_media(pcm[i:i + 6400])
            if finalize:
                await conn.send_finalize()
            await conn.send_close_stream()

        sender = asyncio.create_task(send())
        async for message in conn:
            messages.append(message)
        await sender
    return messages


@pytest.mark.parametrize("wav", WAVS, ids=lambda p: p.stem)
async def test_deepgram_finals_are_the_asr_v1_finals(server, wav):
    srv, stub = server
    audio = load(wav, 16000)
    want = await asr_v1_finals(stub, audio, 16000, endpointing=True)
    messages = await deepgram_messages(srv, pcm16(audio), encoding="linear16", sample_rate=16000,
                                       interim_results="true", vad_events="true")
    results = [m for m in messages if getattr(m, "type", None) == "Results"]
    finals = [m for m in results if m.is_final]
    assert [m.channel.alternatives[0].transcript for m in finals] == want
    assert messages[-1].type == "Metadata" and messages[-1].duration == pytest.approx(len(audio) / 16000, abs=0.01)
    if want:
        assert any(not m.is_final for m in results), "interim results were asked for"
        assert any(getattr(m, "type", None) == "SpeechStarted" for m in messages)
        words = [w.word for m in finals for w in m.channel.alternatives[0].words]
        assert " ".join(words) == " ".join(want)
    await wait_sessions_freed(srv)


async def test_deepgram_wav_without_encoding_bearer_token_and_finalize(server):
    """A WAV file as it is (no encoding: the header gives the format), the SDK's access_token
    (Bearer), endpointing off and Finalize: one final, from_finalize, asr.v1's transcript."""
    srv, stub = server
    audio = load(WAVS[3], 16000)
    want = " ".join(await asr_v1_finals(stub, audio, 16000, endpointing=False))
    messages = await deepgram_messages(srv, WAVS[3].read_bytes(), finalize=True, auth={"access_token": TOKEN},
                                       endpointing="false")
    finals = [m for m in messages if getattr(m, "type", None) == "Results" and m.is_final]
    assert [m.channel.alternatives[0].transcript for m in finals] == ([want] if want else [])
    assert all(m.from_finalize and not m.speech_final for m in finals)
    await wait_sessions_freed(srv)


@pytest.mark.parametrize("params, field", [
    ({"diarize": "true"}, "diarize"), ({"encoding": "opus"}, "encoding"), ({"search": "john"}, "search"),
    ({"language": "fr"}, "language"), ({"sample_rate": "96000", "encoding": "linear16"}, "sample_rate"),
])
async def test_deepgram_refused_parameters_get_400_naming_them(server, params, field):
    srv, _ = server
    with pytest.raises(ApiError) as info:
        await deepgram_messages(srv, b"", **params)
    assert info.value.status_code == 400
    query = "&".join(f"{k}={v}" for k, v in params.items())
    with pytest.raises(websockets.InvalidStatus) as raw:
        async with websockets.connect(f"ws://127.0.0.1:{srv.ws_port}/v1/listen?{query}",
                                      additional_headers={"Authorization": f"Token {TOKEN}"}):
            pass
    response = raw.value.response
    assert response.status_code == 400 and field in response.headers["dg-error"]
    assert field in json.loads(response.body)["err_msg"]
    await wait_sessions_freed(srv)
