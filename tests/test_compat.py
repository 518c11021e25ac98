"""The helpers the Riva and Google adapters share, and reflection listing all three protocols."""

import asyncio
import io
import struct
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import soundfile
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from server.api.compat import AudioIntake, alternatives_decoding, check_language, parse_wav_header, whole_audio
from server.config import ServerSettings
from server.errors import ASRError, ErrorCode
from server.types import DecodingMethod, Encoding, StreamConfig
from tests.conftest import running_server


def wav_bytes(samples: np.ndarray, rate: int, subtype="PCM_16", format="WAV") -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, subtype=subtype, format=format)
    return buf.getvalue()


def test_wav_header_is_parsed_and_skipped():
    pcm = (np.arange(-800, 800, dtype=np.int16) * 20)
    data = wav_bytes(pcm, 22050)
    wav = parse_wav_header(data)
    assert (wav.format_tag, wav.channels, wav.sample_rate, wav.bits) == (1, 1, 22050, 16)
    config = StreamConfig(sample_rate_hertz=22050)
    assert whole_audio(data, config, "config.encoding", None) == pcm.tobytes()
    assert parse_wav_header(pcm.tobytes()) is None


def test_wav_header_with_extra_chunks_and_extensible_format():
    stereo = np.zeros((100, 2), dtype=np.int16)
    data = wav_bytes(stereo, 16000, format="WAVEX")
    assert parse_wav_header(data).format_tag == 1  # the PCM sub-format of WAVE_FORMAT_EXTENSIBLE
    # a LIST chunk of odd size (padded) before fmt
    plain = wav_bytes(stereo, 16000)
    extra = b"LIST" + struct.pack("<I", 5) + b"INFOx\0"
    body = plain[12:]
    data = b"RIFF" + struct.pack("<I", 4 + len(extra) + len(body)) + b"WAVE" + extra + body
    wav = parse_wav_header(data)
    assert (wav.channels, wav.sample_rate) == (2, 16000)
    assert data[wav.data_offset:] == stereo.tobytes()


@pytest.mark.parametrize("data, words", [
    (wav_bytes(np.zeros(10, dtype=np.float32), 16000, subtype="FLOAT"), "16-bit PCM only"),
    (wav_bytes(np.zeros(10, dtype=np.int16), 16000)[:30], "not whole"),
    (wav_bytes(np.zeros(10, dtype=np.int16), 8000), "sample_rate_hertz (16000) must match the WAV header (8000)"),
    (wav_bytes(np.zeros((10, 2), dtype=np.int16), 16000), "audio_channel_count (1) must match the WAV header (2)"),
])
def test_unusable_wav_headers_are_invalid_argument(data, words):
    with pytest.raises(ASRError) as info:
        whole_audio(data, StreamConfig(), "config.encoding LINEAR16", None)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT and words in info.value.message


def test_raw_audio_is_refused_where_the_wav_header_must_tell_the_format():
    with pytest.raises(ASRError, match="only for WAV"):
        whole_audio(bytes(320), StreamConfig(), "config.encoding", "accepted only for WAV audio")


def test_intake_joins_samples_split_across_messages():
    """Neither protocol asks for whole samples per message: an odd split must not change the audio."""
    stereo = (np.arange(2000, dtype=np.int16).reshape(-1, 2) * 7)
    data = wav_bytes(stereo, 16000)
    fed = []
    session = SimpleNamespace(config=StreamConfig(encoding=Encoding.LINEAR16, channels=2), feed=fed.append)
    intake = AudioIntake(session, "config.encoding", None)
    for i in range(0, len(data), 1001):
        intake.feed(data[i:i + 1001])
    intake.feed(b"")
    assert all(len(chunk) % 4 == 0 for chunk in fed)
    assert b"".join(fed) == stereo.tobytes()


def test_alternatives_need_beam_search_as_wide_as_allowed():
    service = SimpleNamespace(settings=ServerSettings(model="random-small", beam_width=4, max_beam_width=8))
    assert alternatives_decoding(service, 0, "f") == (None, 0, 1)
    assert alternatives_decoding(service, 1, "f") == (None, 0, 1)
    assert alternatives_decoding(service, 3, "f") == (DecodingMethod.BEAM_SEARCH, 4, 3)
    assert alternatives_decoding(service, 30, "f") == (DecodingMethod.BEAM_SEARCH, 8, 8)  # "may return fewer"
    with pytest.raises(ASRError, match="f must not be negative"):
        alternatives_decoding(service, -1, "f")


@pytest.mark.parametrize("code", ["", "en", "en-US", "en-gb", "EN_au"])
def test_english_is_accepted(code):
    check_language(code, "config.language_code")


@pytest.mark.parametrize("code", ["de-DE", "fr", "es-US", "zh"])
def test_other_languages_are_refused_naming_the_field(code):
    with pytest.raises(ASRError, match=f"config.language_code '{code}' is not available"):
        check_language(code, "config.language_code")


async def test_reflection_lists_and_describes_all_three_protocols():
    expected = {
        "asr.v1.SpeechRecognition": {"StreamingRecognize", "Recognize", "GetModelInfo"},
        "nvidia.riva.asr.RivaSpeechRecognition": {"StreamingRecognize", "Recognize",
                                                  "GetRivaSpeechRecognitionConfig"},
        "google.cloud.speech.v1.Speech": {"StreamingRecognize", "Recognize"},
    }
    async with running_server() as (server, _):
        def reflect():
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                db = ProtoReflectionDescriptorDatabase(channel)
                pool = descriptor_pool.DescriptorPool(db)
                return set(db.get_services()), {
                    name: {m.name for m in pool.FindServiceByName(name).methods} for name in expected}

        services, methods = await asyncio.to_thread(reflect)
    assert set(expected) <= services
    assert methods == expected
