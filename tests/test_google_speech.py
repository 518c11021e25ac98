"""Google Cloud Speech v1 clients work unchanged: the unmodified ``google-cloud-speech`` package.

``SpeechClient`` is synchronous (grpc threads); each call runs in ``asyncio.to_thread`` while the
grpc.aio test server runs on the test's event loop. The client gets an insecure channel to the
test server, so it needs no Google credentials.
"""

import asyncio

import grpc
import pytest
import soundfile
from google.api_core import exceptions
from google.cloud import speech_v1 as speech
from google.cloud.speech_v1.services.speech.transports import SpeechGrpcTransport

from asr.v1 import asr_pb2
from tests.conftest import SAMPLES, running_server
from tests.helpers import final_results
from tests.test_bad_input import wait_sessions_freed

WAVS = sorted(SAMPLES.glob("*.wav"))
LINEAR16 = speech.RecognitionConfig.AudioEncoding.LINEAR16


@pytest.fixture(scope="module")
async def server():
    async with running_server() as pair:
        yield pair


class Client:
    """A ``SpeechClient`` on an insecure channel to the test server (closed on exit)."""

    def __init__(self, server):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        self.speech = speech.SpeechClient(transport=SpeechGrpcTransport(channel=self.channel))

    def __enter__(self) -> speech.SpeechClient:
        return self.speech

    def __exit__(self, *exc):
        self.channel.close()


def google_stream(server, data: bytes, config: speech.RecognitionConfig, chunk_bytes=4097,
                  **streaming) -> list[speech.StreamingRecognizeResponse]:
    """What Google's streaming sample does: the file's bytes (a WAV header included) in chunks;
    an odd chunk size splits samples across messages."""
    requests = (speech.StreamingRecognizeRequest(audio_content=data[i:i + chunk_bytes])
                for i in range(0, len(data), chunk_bytes))
    with Client(server) as client:
        return list(client.streaming_recognize(
            config=speech.StreamingRecognitionConfig(config=config, **streaming), requests=requests))


def finals(responses) -> list[str]:
    return [r.alternatives[0].transcript for response in responses for r in response.results if r.is_final]


def english(**kw) -> speech.RecognitionConfig:
    return speech.RecognitionConfig(**{"encoding": LINEAR16, "sample_rate_hertz": 16000,
                                       "language_code": "en-US", **kw})


async def asr_v1_finals(stub, wav, **options) -> list:
    audio, _ = soundfile.read(wav, dtype="float32")
    return await final_results(stub, audio, endpointing=True, **options)


@pytest.mark.parametrize("wav", WAVS, ids=lambda p: p.stem)
async def test_streaming_gives_the_asr_v1_transcript(server, wav):
    srv, stub = server
    expected = [r.alternatives[0].transcript for r in await asr_v1_finals(stub, wav)]
    responses = await asyncio.to_thread(google_stream, srv, wav.read_bytes(), english(), interim_results=True)
    assert "".join(expected), "the model should emit text, or the comparison proves little"
    assert finals(responses) == [t for t in expected if t]
    interim = [r for response in responses for r in response.results if not r.is_final]
    assert interim and all(0 < r.stability <= 1 for r in interim)
    final = [r for response in responses for r in response.results if r.is_final]
    assert all(r.language_code == "en-us" and r.alternatives[0].confidence > 0 for r in final)
    assert [r.result_end_time for r in final] == sorted(r.result_end_time for r in final)
    await wait_sessions_freed(srv)


async def test_unary_recognize_equals_asr_v1_recognize(server):
    srv, stub = server
    audio, rate = soundfile.read(WAVS[1], dtype="int16")
    want = await stub.Recognize(asr_pb2.RecognizeRequest(
        config=asr_pb2.RecognitionConfig(encoding=asr_pb2.LINEAR16, sample_rate_hertz=rate,
                                         enable_word_time_offsets=True),
        audio_content=audio.tobytes()))

    def recognize():
        with Client(srv) as client:  # Google's sample: the WAV file's bytes, header included
            return client.recognize(config=english(enable_word_time_offsets=True),
                                    audio=speech.RecognitionAudio(content=WAVS[1].read_bytes()))

    got = await asyncio.to_thread(recognize)
    assert want.results and [r.alternatives[0].transcript for r in got.results] == \
        [r.alternatives[0].transcript for r in want.results]
    words = [w for r in got.results for w in r.alternatives[0].words]
    want_words = [w for r in want.results for w in r.alternatives[0].words]
    assert words and [(w.word, w.start_time, w.end_time) for w in words] == [
        (w.word, w.start_time.ToTimedelta(), w.end_time.ToTimedelta()) for w in want_words]
    await wait_sessions_freed(srv)


async def test_encoding_unspecified_is_read_from_the_wav_header(server):
    srv, stub = server
    expected = [r.alternatives[0].transcript for r in await asr_v1_finals(stub, WAVS[2])]
    config = speech.RecognitionConfig(sample_rate_hertz=16000, language_code="en-US")
    responses = await asyncio.to_thread(google_stream, srv, WAVS[2].read_bytes(), config)
    assert finals(responses) == [t for t in expected if t]


async def test_single_utterance_ends_after_the_first_final(server):
    srv, stub = server
    expected = [r.alternatives[0].transcript for r in await asr_v1_finals(stub, WAVS[0])]
    assert len([t for t in expected if t]) > 1, "the sample should hold more than one utterance"
    responses = await asyncio.to_thread(google_stream, srv, WAVS[0].read_bytes(), english(),
                                        single_utterance=True, interim_results=True)
    event = speech.StreamingRecognizeResponse.SpeechEventType.END_OF_SINGLE_UTTERANCE
    kinds = [("event" if r.speech_event_type == event else "final" if r.results[0].is_final else "interim")
             for r in responses]
    assert kinds[-2:] == ["event", "final"] and kinds.count("final") == 1, kinds
    assert finals(responses) == expected[:1]
    await wait_sessions_freed(srv)


async def test_max_alternatives(server):
    srv, _ = server
    responses = await asyncio.to_thread(google_stream, srv, WAVS[3].read_bytes(), english(max_alternatives=3))
    final = [r for response in responses for r in response.results if r.is_final]
    assert final and all(1 <= len(r.alternatives) <= 3 for r in final)
    assert max(len(r.alternatives) for r in final) > 1


# --- bad input gets Google's status (google.api_core exceptions), naming the field ----------------
BAD_CONFIGS = {
    "mp3": (dict(encoding=speech.RecognitionConfig.AudioEncoding.MP3), "config.encoding MP3"),
    "flac": (dict(encoding=speech.RecognitionConfig.AudioEncoding.FLAC), "config.encoding FLAC"),
    "french": (dict(language_code="fr-FR"), "config.language_code"),
    "alternative languages": (dict(alternative_language_codes=["de-DE"]), "config.alternative_language_codes"),
    "phone model": (dict(model="phone_call"), "config.model"),
    "profanity filter": (dict(profanity_filter=True), "config.profanity_filter"),
    "class token": (dict(speech_contexts=[speech.SpeechContext(phrases=["weather", "$OOV_CLASS_DIGIT_SEQUENCE"])]),
                    "config.speech_contexts[0].phrases[1]"),
    "custom class": (dict(adaptation=speech.SpeechAdaptation(custom_classes=[speech.CustomClass(custom_class_id="x")])),
                     "config.adaptation.custom_classes"),
    "phrase set reference": (dict(adaptation=speech.SpeechAdaptation(phrase_set_references=["projects/p/x"])),
                             "config.adaptation.phrase_set_references"),
    "phrase boost": (dict(speech_contexts=[speech.SpeechContext(phrases=["weather"], boost=50)]), "--max-boost"),
    "diarization": (dict(diarization_config=speech.SpeakerDiarizationConfig(enable_speaker_diarization=True)),
                    "config.diarization_config"),
    "spoken punctuation": (dict(enable_spoken_punctuation=True), "config.enable_spoken_punctuation"),
    "per channel": (dict(audio_channel_count=2, enable_separate_recognition_per_channel=True),
                    "config.enable_separate_recognition_per_channel"),
    "sample rate": (dict(sample_rate_hertz=96000), "config.sample_rate_hertz"),
    "channels": (dict(audio_channel_count=9), "config.audio_channel_count"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
@pytest.mark.parametrize("mode", ["streaming", "unary"])
async def test_bad_config_is_invalid_argument_naming_the_field(server, case, mode):
    srv, _ = server
    fields, words = BAD_CONFIGS[case]
    config = english(**fields)

    def call():
        if mode == "streaming":
            return google_stream(srv, bytes(6400), config)
        with Client(srv) as client:
            return client.recognize(config=config, audio=speech.RecognitionAudio(content=bytes(6400)))

    with pytest.raises(exceptions.InvalidArgument) as info:
        await asyncio.to_thread(call)
    assert info.value.grpc_status_code == grpc.StatusCode.INVALID_ARGUMENT
    assert words in info.value.message
    await wait_sessions_freed(srv)


async def test_bad_audio_gets_google_errors(server):
    srv, _ = server

    def recognize(audio):
        with Client(srv) as client:
            return client.recognize(config=english(), audio=audio)

    with pytest.raises(exceptions.InvalidArgument, match="audio.uri"):
        await asyncio.to_thread(recognize, speech.RecognitionAudio(uri="gs://bucket/file.wav"))
    with pytest.raises(exceptions.InvalidArgument, match="must match the WAV header"):
        await asyncio.to_thread(google_stream, srv, WAVS[0].read_bytes(), english(sample_rate_hertz=8000))
    raw = english(encoding=speech.RecognitionConfig.AudioEncoding.ENCODING_UNSPECIFIED)
    with pytest.raises(exceptions.InvalidArgument, match="ENCODING_UNSPECIFIED"):
        await asyncio.to_thread(google_stream, srv, bytes(6400), raw)
    with pytest.raises(exceptions.InvalidArgument, match="enable_voice_activity_events"):
        await asyncio.to_thread(google_stream, srv, bytes(6400), english(), enable_voice_activity_events=True)
    await wait_sessions_freed(srv)


async def test_long_running_recognize_is_unimplemented(server):
    srv, _ = server

    def call():
        with Client(srv) as client:
            return client.long_running_recognize(config=english(),
                                                 audio=speech.RecognitionAudio(content=bytes(6400)))

    with pytest.raises(exceptions.MethodNotImplemented):
        await asyncio.to_thread(call)


async def test_over_long_stream_is_out_of_range():
    """Google ends streams over its duration limit with OUT_OF_RANGE; so does this server."""
    async with running_server(max_stream_seconds=1.0) as (srv, _):
        with pytest.raises(exceptions.OutOfRange, match="maximum duration"):
            await asyncio.to_thread(google_stream, srv, WAVS[0].read_bytes(), english())
        await wait_sessions_freed(srv)
