"""NVIDIA Riva ASR clients work unchanged: the unmodified ``riva.client`` package against our server.

The official client is synchronous (grpc threads), so each call runs in ``asyncio.to_thread``
while the grpc.aio test server runs on the test's event loop.
"""

import asyncio
import io

import grpc
import numpy as np
import pytest
import riva.client
import soundfile
import soxr
from riva.client.proto import riva_asr_pb2 as rasr

from asr.v1 import asr_pb2
from client.stream import pcm16
from tests.conftest import SAMPLES, running_server
from tests.helpers import beam_options, final_results
from tests.test_bad_input import wait_sessions_freed

WAVS = sorted(SAMPLES.glob("*.wav"))


@pytest.fixture(scope="module")
async def server():
    async with running_server() as pair:
        yield pair


def riva_asr(server) -> riva.client.ASRService:
    return riva.client.ASRService(riva.client.Auth(uri=f"127.0.0.1:{server.port}", use_ssl=False))


def riva_stream_finals(server, wav, config: rasr.RecognitionConfig, interim=True) -> list:
    """What riva's own transcribe_file example does: WAV specs into the config, then the file
    (header included) in chunks. Returns the final results."""
    asr = riva_asr(server)
    streaming = riva.client.StreamingRecognitionConfig(config=config, interim_results=interim)
    riva.client.add_audio_file_specs_to_config(streaming, wav)
    try:
        with riva.client.AudioChunkFileIterator(wav, 1600) as chunks:
            responses = list(asr.streaming_response_generator(chunks, streaming))
    finally:
        asr.auth.channel.close()
    return [r for response in responses for r in response.results if r.is_final]


def riva_offline(server, audio: bytes, config: rasr.RecognitionConfig) -> rasr.RecognizeResponse:
    asr = riva_asr(server)
    try:
        return asr.offline_recognize(audio, config)
    finally:
        asr.auth.channel.close()


def english(**kw) -> rasr.RecognitionConfig:
    return riva.client.RecognitionConfig(**{"language_code": "en-US", "max_alternatives": 1, **kw})


async def asr_v1_finals(stub, wav, **options) -> list:
    audio, _ = soundfile.read(wav, dtype="float32")
    return await final_results(stub, audio, endpointing=True, **options)


@pytest.mark.parametrize("wav", WAVS, ids=lambda p: p.stem)
async def test_streaming_gives_the_asr_v1_transcript(server, wav):
    srv, stub = server
    expected = [r.alternatives[0].transcript for r in await asr_v1_finals(stub, wav)]
    finals = await asyncio.to_thread(riva_stream_finals, srv, wav, english(
        enable_automatic_punctuation=True, verbatim_transcripts=True))
    got = [r.alternatives[0].transcript for r in finals]
    assert "".join(expected), "the model should emit text, or the comparison proves little"
    # Riva's finals end with a space, so that its clients' `+=` joins them into words.
    assert got == [t + " " for t in expected if t]
    assert all(r.audio_processed > 0 for r in finals)
    await wait_sessions_freed(srv)


async def test_encoding_unspecified_reads_the_wav_header(server):
    """riva's transcribe_file example leaves the encoding unset and sends the WAV file as it is."""
    srv, stub = server
    expected = [r.alternatives[0].transcript + " " for r in await asr_v1_finals(stub, WAVS[1])]
    finals = await asyncio.to_thread(riva_stream_finals, srv, WAVS[1], riva.client.RecognitionConfig())
    assert [r.alternatives[0].transcript for r in finals] == expected


async def test_offline_recognize_equals_asr_v1_recognize(server):
    srv, stub = server
    data = WAVS[0].read_bytes()
    audio, rate = soundfile.read(WAVS[0], dtype="int16")
    want = await stub.Recognize(asr_pb2.RecognizeRequest(
        config=asr_pb2.RecognitionConfig(encoding=asr_pb2.LINEAR16, sample_rate_hertz=rate),
        audio_content=audio.tobytes()))
    got = await asyncio.to_thread(riva_offline, srv, data, english(
        encoding=riva.client.AudioEncoding.LINEAR_PCM, sample_rate_hertz=rate, audio_channel_count=1))
    assert want.results and [r.alternatives[0].transcript + " " for r in want.results] == \
        [r.alternatives[0].transcript for r in got.results]
    await wait_sessions_freed(srv)


async def test_resampled_stereo_and_word_times_match_asr_v1(server, speech):
    """44.1 kHz stereo raw PCM: the same decode path, words in Riva's milliseconds."""
    srv, stub = server
    mono = speech[2][1]
    buf = io.BytesIO()
    stereo = np.stack([soxr.resample(mono, 16000, 44100)] * 2, axis=1)
    soundfile.write(buf, stereo, 44100, subtype="PCM_16", format="RAW")
    raw = buf.getvalue()
    want = await stub.Recognize(asr_pb2.RecognizeRequest(
        config=asr_pb2.RecognitionConfig(encoding=asr_pb2.LINEAR16, sample_rate_hertz=44100,
                                         audio_channel_count=2, enable_word_time_offsets=True),
        audio_content=raw))
    got = await asyncio.to_thread(riva_offline, srv, raw, english(
        encoding=riva.client.AudioEncoding.LINEAR_PCM, sample_rate_hertz=44100, audio_channel_count=2,
        enable_word_time_offsets=True))
    words = [w for r in got.results for w in r.alternatives[0].words]
    want_words = [w for r in want.results for w in r.alternatives[0].words]
    assert want_words and [w.word for w in words] == [w.word for w in want_words]
    assert [(w.start_time, w.end_time) for w in words] == [
        (round(w.start_time.ToNanoseconds() / 1e6), round(w.end_time.ToNanoseconds() / 1e6)) for w in want_words]
    assert all(0 <= w.start_time <= w.end_time for w in words)


async def test_max_alternatives_uses_beam_search(server):
    srv, stub = server
    want = await asr_v1_finals(stub, WAVS[3], max_alternatives=3, **beam_options(4))
    finals = await asyncio.to_thread(riva_stream_finals, srv, WAVS[3], english(max_alternatives=3), False)
    assert [[a.transcript.strip() for a in r.alternatives] for r in finals] == \
        [[a.transcript for a in r.alternatives] for r in want if r.alternatives[0].transcript]
    assert max(len(r.alternatives) for r in finals) > 1
    assert all(r.alternatives[0].confidence > 0 for r in finals)


async def test_endpointing_stop_history_is_the_trailing_silence(server, speech):
    """Riva's stop_history (ms) is asr.v1's endpointing.trailing_silence_ms."""
    srv, stub = server
    audio = dict((name, a) for name, a, _ in speech)[WAVS[0].stem]
    want = await _asr_v1_finals_with_silence(stub, audio, trailing_silence_ms=160)
    got = await asyncio.to_thread(riva_stream_finals, srv, WAVS[0], english(
        endpointing_config=rasr.EndpointingConfig(stop_history=160)))
    assert [r.alternatives[0].transcript for r in got] == [t + " " for t in want if t]
    assert len(want) > len(await asr_v1_finals(stub, WAVS[0])), "160 ms should cut more utterances than 800 ms"


async def _asr_v1_finals_with_silence(stub, audio, trailing_silence_ms) -> list[str]:
    config = asr_pb2.StreamingRecognizeRequest(streaming_config=asr_pb2.StreamingRecognitionConfig(
        config=asr_pb2.RecognitionConfig(
            encoding=asr_pb2.LINEAR16, sample_rate_hertz=16000,
            endpointing=asr_pb2.EndpointingConfig(trailing_silence_ms=trailing_silence_ms))))
    pcm = pcm16(audio)

    async def requests():
        yield config
        for i in range(0, len(pcm), 5120):
            yield asr_pb2.StreamingRecognizeRequest(audio_content=pcm[i:i + 5120])
    return [r.alternatives[0].transcript
            async for response in stub.StreamingRecognize(requests()) for r in response.results if r.is_final]


async def test_get_config_describes_the_model(server):
    srv, _ = server

    def get(name=""):
        asr = riva_asr(srv)
        try:
            return asr.stub.GetRivaSpeechRecognitionConfig(rasr.RivaSpeechRecognitionConfigRequest(model_name=name))
        finally:
            asr.auth.channel.close()

    response = await asyncio.to_thread(get)
    (model,) = response.model_config
    assert model.model_name == srv.model.name
    assert model.parameters["language_code"] == "en-US" and model.parameters["type"] == "online"
    assert model.parameters["sample_rate"] == "16000"
    assert (await asyncio.to_thread(get, srv.model.name)).model_config[0].model_name == srv.model.name
    assert not (await asyncio.to_thread(get, "no-such-model")).model_config


# --- bad input gets Riva's (gRPC's canonical) status, naming the field ----------------------------
LINEAR = dict(encoding=riva.client.AudioEncoding.LINEAR_PCM, sample_rate_hertz=16000)
BAD_CONFIGS = {
    "flac": (dict(encoding=riva.client.AudioEncoding.FLAC, sample_rate_hertz=16000), "config.encoding FLAC"),
    "mulaw": (dict(encoding=riva.client.AudioEncoding.MULAW, sample_rate_hertz=8000), "config.encoding MULAW"),
    "german": (dict(LINEAR, language_code="de-DE"), "config.language_code"),
    "other model": (dict(LINEAR, model="parakeet-ctc-1.1b-en-US-asr-streaming"), "config.model"),
    "profanity filter": (dict(LINEAR, profanity_filter=True), "config.profanity_filter"),
    "word boost": (dict(LINEAR, speech_contexts=[rasr.SpeechContext(phrases=["x"], boost=50)]), "--max-boost"),
    "phrase too long": (dict(LINEAR, speech_contexts=[rasr.SpeechContext(phrases=["x" * 51])]),
                        "--max-phrase-chars"),
    "diarization": (dict(LINEAR, diarization_config=rasr.SpeakerDiarizationConfig(enable_speaker_diarization=True)),
                    "config.diarization_config"),
    "per channel": (dict(LINEAR, enable_separate_recognition_per_channel=True),
                    "config.enable_separate_recognition_per_channel"),
    "custom configuration": (dict(LINEAR, custom_configuration={"enable_vad_endpointing": "true"}),
                             "config.custom_configuration"),
    "vad threshold": (dict(LINEAR, endpointing_config=rasr.EndpointingConfig(stop_threshold=0.9)),
                      "config.endpointing_config.stop_threshold"),
    "stop history too short": (dict(LINEAR, endpointing_config=rasr.EndpointingConfig(stop_history=10)),
                               "config.endpointing_config.stop_history"),
    "sample rate": (dict(encoding=riva.client.AudioEncoding.LINEAR_PCM, sample_rate_hertz=4000),
                    "config.sample_rate_hertz"),
    "no sample rate": (dict(encoding=riva.client.AudioEncoding.LINEAR_PCM), "config.sample_rate_hertz"),
    "negative alternatives": (dict(LINEAR, max_alternatives=-1), "config.max_alternatives"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
@pytest.mark.parametrize("mode", ["streaming", "offline"])
async def test_bad_config_is_invalid_argument_naming_the_field(server, case, mode):
    srv, _ = server
    fields, words = BAD_CONFIGS[case]
    config = riva.client.RecognitionConfig(**fields)

    def call():
        asr = riva_asr(srv)
        try:
            if mode == "offline":
                return asr.offline_recognize(bytes(3200), config)
            streaming = riva.client.StreamingRecognitionConfig(config=config)
            return list(asr.streaming_response_generator([bytes(3200)] * 3, streaming))
        finally:
            asr.auth.channel.close()

    with pytest.raises(grpc.RpcError) as info:
        await asyncio.to_thread(call)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert words in info.value.details()
    await wait_sessions_freed(srv)


def _stream_raw(srv, requests):
    asr = riva_asr(srv)
    try:
        return list(asr.stub.StreamingRecognize(iter(requests)))
    finally:
        asr.auth.channel.close()


def _config_request(**fields):
    return rasr.StreamingRecognizeRequest(streaming_config=rasr.StreamingRecognitionConfig(
        config=riva.client.RecognitionConfig(**fields)))


BAD_STREAMS = {
    "raw audio, encoding unspecified": (
        [_config_request(sample_rate_hertz=16000), rasr.StreamingRecognizeRequest(audio_content=bytes(3200))],
        "ENCODING_UNSPECIFIED"),
    "wav header disagrees with the config": (
        [_config_request(sample_rate_hertz=8000), rasr.StreamingRecognizeRequest(audio_content=WAVS[0].read_bytes())],
        "must match the WAV header (16000)"),
    "audio first": ([rasr.StreamingRecognizeRequest(audio_content=bytes(3200))], "first message"),
    "config twice": ([_config_request(**LINEAR), _config_request(**LINEAR)], "sent twice"),
    "runtime config": ([_config_request(**LINEAR), rasr.StreamingRecognizeRequest(
        audio_content=bytes(320), runtime_config={"x": "1"})], "runtime_config"),
}


@pytest.mark.parametrize("case", list(BAD_STREAMS))
async def test_bad_stream_is_invalid_argument_and_frees_the_session(server, case):
    srv, _ = server
    requests, words = BAD_STREAMS[case]
    with pytest.raises(grpc.RpcError) as info:
        await asyncio.to_thread(_stream_raw, srv, requests)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert words in info.value.details()
    await wait_sessions_freed(srv)


async def test_stream_limit_is_resource_exhausted(speech):
    async with running_server(max_streams=1) as (srv, stub):
        pcm = pcm16(speech[0][1])

        async def slow():
            yield asr_pb2.StreamingRecognizeRequest(streaming_config=asr_pb2.StreamingRecognitionConfig(
                config=asr_pb2.RecognitionConfig(encoding=asr_pb2.LINEAR16, sample_rate_hertz=16000)))
            for i in range(0, len(pcm), 5120):
                yield asr_pb2.StreamingRecognizeRequest(audio_content=pcm[i:i + 5120])
                await asyncio.sleep(0.05)

        call = stub.StreamingRecognize(slow())
        for _ in range(500):
            if srv.active_sessions:
                break
            await asyncio.sleep(0.01)
        assert srv.active_sessions == 1
        with pytest.raises(grpc.RpcError) as info:
            await asyncio.to_thread(_stream_raw, srv, [_config_request(**LINEAR)])
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        call.cancel()
        await wait_sessions_freed(srv)
