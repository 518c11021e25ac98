"""Contextual biasing through the real server: a phrase the demo model misses is recognised with it;
a stream without phrases gets exactly the tokens of the unbiased decoders (torchaudio's own path)
even when batched with streams that have phrases; streams with and without phrases batched together
equal their solo runs; the limits and the bad phrases each get INVALID_ARGUMENT naming what is wrong.
The audio is the committed biasing test set (``tests/data/bias-phrases``, held-out voices)."""

from __future__ import annotations

import asyncio
import json
import random
from urllib.parse import urlencode

import grpc
import numpy as np
import pytest
import soundfile
import torch
import websockets

from asr.v1 import asr_pb2
from server.model.loading import load_model
from tests import reference
from tests.conftest import ROOT, running_server
from tests.helpers import GREEDY, beam_options, transcript

BIAS_SET = ROOT / "tests" / "data" / "bias-phrases"


@pytest.fixture(scope="module")
def bias_set() -> list[tuple[dict, np.ndarray]]:
    items = [json.loads(line) for line in (BIAS_SET / "manifest.jsonl").read_text().splitlines() if line.strip()]
    out = []
    for item in items[:12]:
        audio, rate = soundfile.read(BIAS_SET / item["audio"], dtype="float32")
        assert rate == 16000 and audio.ndim == 1
        out.append((item, audio))
    return out


@pytest.fixture(scope="module")
def demo():
    return load_model("demo")


@pytest.fixture(scope="module")
async def demo_server(demo):
    async with running_server(model=demo, max_batch=16) as pair:
        yield pair


def with_phrases(phrases, boost=0.0, **options) -> dict:
    return {**options, "phrases": tuple(phrases), "boost": boost}


async def test_a_name_the_model_misses_is_recognised_as_a_phrase(demo_server, bias_set):
    """'video call beatrice' (a held-out voice): the demo model never heard 'beatrice'; with the
    word as a phrase, beam search spells it; the other words stay."""
    _, stub = demo_server
    item, audio = bias_set[0]
    assert item["phrase"] == "beatrice" and item["text"] == "video call beatrice"
    beam = beam_options(4)
    plain = await transcript(stub, audio, **beam)
    assert "beatrice" not in plain.split(), plain
    biased = await transcript(stub, audio, **with_phrases(["beatrice"], 8.0, **beam))
    assert biased == "video call beatrice", biased
    # unary Recognize carries the same phrases
    request = asr_pb2.RecognizeRequest(
        config=asr_pb2.RecognitionConfig(
            encoding=asr_pb2.LINEAR16, sample_rate_hertz=16000, decoding_method=asr_pb2.BEAM_SEARCH,
            beam_width=4, endpointing=asr_pb2.EndpointingConfig(disabled=True),
            speech_contexts=[asr_pb2.SpeechContext(phrases=["beatrice"], boost=8.0)]),
        audio_content=(np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    response = await stub.Recognize(request)
    assert " ".join(r.alternatives[0].transcript for r in response.results) == biased


@pytest.mark.parametrize("options", [GREEDY, beam_options(4)], ids=["greedy", "beam4"])
async def test_streams_without_phrases_are_exact_and_batching_stays_invariant(demo_server, demo, bias_set, options):
    """Six streams, three with (different) phrase lists, three without: every stream batched with
    the others equals its solo run, and each stream without phrases equals torchaudio's own
    single-stream decoding of the same audio (the decoders' result with no biasing at all)."""
    server, stub = demo_server
    unrelated = (BIAS_SET / "unrelated.txt").read_text().split("\n")
    unrelated = [p.strip() for p in unrelated if p.strip()][:100]
    assert len(unrelated) == 100
    streams = [(audio, with_phrases([item["phrase"]], 8.0, **options) if k % 2 == 0 else dict(options))
               for k, (item, audio) in enumerate(bias_set[:6])]
    streams[2] = (streams[2][0], with_phrases(unrelated, 0.0, **options))  # 100 phrases, the default boost
    solo = [await transcript(stub, audio, **opts) for audio, opts in streams]
    plain = [await transcript(stub, audio, **options) for audio, _ in streams[::2]]
    assert plain != solo[::2], "phrases should change a transcript, or the comparison proves little"
    rng = random.Random(5)

    async def delayed(audio, opts, delay):
        await asyncio.sleep(delay)
        return await transcript(stub, audio, **opts)

    together = await asyncio.gather(*(delayed(audio, opts, i * 0.03 + rng.random() * 0.03)
                                      for i, (audio, opts) in enumerate(streams)))
    assert together == solo
    beam = options.get("beam_width", 0)
    for k in (1, 3, 5):
        audio = torch.from_numpy(streams[k][0])
        expected = (reference.beam_search_tokens(demo, audio, beam) if beam else reference.greedy_tokens(demo, audio))
        assert together[k] == demo.tokens.text(expected), f"stream {k} without phrases changed"
    assert server.active_sessions == 0


@pytest.mark.parametrize("contexts, message", [
    ([asr_pb2.SpeechContext(phrases=["a"] * 6)], "6 phrases; the limit is 5 per request (--max-phrases)"),
    ([asr_pb2.SpeechContext(phrases=["abc"] * 3), asr_pb2.SpeechContext(phrases=["d"] * 3)], "--max-phrases"),
    ([asr_pb2.SpeechContext(phrases=["x" * 21])], "21 characters is longer than the limit of 20 (--max-phrase-chars)"),
    ([asr_pb2.SpeechContext(phrases=["ok"], boost=9)], "boost 9 is outside [0.5, 8] (--min-boost, --max-boost"),
    ([asr_pb2.SpeechContext(phrases=["ok"], boost=-1)], "boost -1 is outside"),
    ([asr_pb2.SpeechContext(phrases=["ok"], boost=float("nan"))], "boost nan is outside"),
    ([asr_pb2.SpeechContext(phrases=["  "])], "a phrase is empty"),
    ([asr_pb2.SpeechContext(phrases=["caf\u00e9"])], "no token for: '\u00e9'"),
])
async def test_limits_and_bad_phrases_are_refused_by_name(demo, contexts, message):
    async with running_server(model=demo, max_phrases=5, max_phrase_chars=20, min_boost=0.5, max_boost=8,
                              default_boost=2) as (_, stub):
        info = await stub.GetModelInfo(asr_pb2.GetModelInfoRequest())
        assert (info.limits.max_phrases, info.limits.max_phrase_chars) == (5, 20)
        assert (info.limits.min_boost, info.limits.max_boost, info.limits.default_boost) == (0.5, 8, 2)
        config = asr_pb2.RecognitionConfig(encoding=asr_pb2.LINEAR16, sample_rate_hertz=16000,
                                           speech_contexts=contexts)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Recognize(asr_pb2.RecognizeRequest(config=config, audio_content=b"\0\0" * 1600))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in refused.value.details()

        async def stream():
            yield asr_pb2.StreamingRecognizeRequest(streaming_config=asr_pb2.StreamingRecognitionConfig(config=config))
            yield asr_pb2.StreamingRecognizeRequest(audio_content=b"\0\0" * 1600)

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.StreamingRecognize(stream()):
                pass
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in refused.value.details()


async def test_riva_and_google_speech_contexts_are_honoured(demo, bias_set):
    """The vendors' own clients: Riva's ``speech_contexts {phrases, boost}``, Google's
    ``speech_contexts`` and ``adaptation.phrase_sets`` (a phrase's own boost over its set's)."""
    import riva.client
    from google.cloud import speech
    from riva.client.proto import riva_asr_pb2 as rasr

    from tests.test_google_speech import Client
    from tests.test_riva import riva_offline

    item, audio = bias_set[0]
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    async with running_server(model=demo, decoding_method="beam", beam_width=4) as (srv, _):
        def riva_text(**contexts):
            config = riva.client.RecognitionConfig(
                encoding=riva.client.AudioEncoding.LINEAR_PCM, sample_rate_hertz=16000, language_code="en-US",
                max_alternatives=1, **contexts)
            return " ".join(r.alternatives[0].transcript.strip() for r in riva_offline(srv, pcm, config).results)

        def google_text(**contexts):
            config = speech.RecognitionConfig(encoding=speech.RecognitionConfig.AudioEncoding.LINEAR16,
                                              sample_rate_hertz=16000, language_code="en-US", **contexts)
            with Client(srv) as client:
                response = client.recognize(config=config, audio=speech.RecognitionAudio(content=pcm))
            return " ".join(r.alternatives[0].transcript for r in response.results)

        assert "beatrice" not in (await asyncio.to_thread(riva_text)).split()
        riva_contexts = [rasr.SpeechContext(phrases=["beatrice"], boost=8)]
        assert "beatrice" in (await asyncio.to_thread(riva_text, speech_contexts=riva_contexts)).split()
        assert "beatrice" not in (await asyncio.to_thread(google_text)).split()
        google_contexts = [speech.SpeechContext(phrases=["beatrice"], boost=8)]
        assert "beatrice" in (await asyncio.to_thread(google_text, speech_contexts=google_contexts)).split()
        phrase_set = speech.PhraseSet(phrases=[speech.PhraseSet.Phrase(value="beatrice", boost=8)], boost=0.5)
        adapted = await asyncio.to_thread(google_text, adaptation=speech.SpeechAdaptation(phrase_sets=[phrase_set]))
        assert "beatrice" in adapted.split()
        weak = speech.PhraseSet(phrases=[speech.PhraseSet.Phrase(value="beatrice")], boost=0.5)
        assert "beatrice" not in (await asyncio.to_thread(
            google_text, adaptation=speech.SpeechAdaptation(phrase_sets=[weak]))).split()


async def test_deepgram_keyterm_and_keywords_are_phrases(demo, bias_set):
    """Deepgram's own SDK on the WebSocket port: ``keyterm`` (repeatable, the server's default boost)
    and ``keywords=WORD:BOOST`` carry phrases as asr.v1's speech contexts do (the same transcript as
    asr.v1 with the same phrase and boost); past the limits, a boost outside them, a boost that is
    not a number or a character the model cannot spell get HTTP 400 naming the parameter."""
    from deepgram.core.api_error import ApiError

    from client.stream import pcm16
    from tests.test_websocket import deepgram_messages

    item, audio = bias_set[0]
    pcm = pcm16(audio)
    async with running_server(model=demo, ws_port=0, decoding_method="beam", beam_width=4, default_boost=8,
                              max_phrases=3, max_phrase_chars=20) as (srv, stub):
        async def deepgram_text(**params) -> str:
            messages = await deepgram_messages(srv, pcm, encoding="linear16", sample_rate=16000,
                                               endpointing="false", **params)
            return " ".join(m.channel.alternatives[0].transcript for m in messages
                            if getattr(m, "type", None) == "Results" and m.is_final
                            and m.channel.alternatives[0].transcript)

        plain = await deepgram_text()
        assert "beatrice" not in plain.split(), plain
        with_phrase = await transcript(stub, audio, **with_phrases(["beatrice"], 8.0, **beam_options(4)))
        assert "beatrice" in with_phrase.split()
        assert await deepgram_text(keyterm=["beatrice", "harriet"]) == with_phrase
        assert await deepgram_text(keywords="beatrice:8") == with_phrase
        assert await deepgram_text(keywords=["beatrice:0.5"]) == await transcript(
            stub, audio, **with_phrases(["beatrice"], 0.5, **beam_options(4)))
        for params, message in [
            ({"keyterm": ["a", "b"], "keywords": ["c", "d"]}, "4 phrases; the limit is 3 per request (--max-phrases)"),
            ({"keywords": "beatrice:99"}, "boost 99 is outside [0.1, 20]"),
            ({"keywords": "beatrice:-2"}, "boost -2 is outside"),
            ({"keywords": "beatrice:loud"}, "must be WORD or WORD:BOOST"),
            ({"keyterm": "beatrice:2"}, "no token for: ':'"),
            ({"keyterm": "caf\u00e9"}, "no token for: '\u00e9'"),
            ({"keyterm": "x" * 21}, "longer than the limit of 20 (--max-phrase-chars)"),
        ]:
            with pytest.raises(ApiError) as refused:
                await deepgram_messages(srv, b"", **params)
            assert refused.value.status_code == 400, params
            with pytest.raises(websockets.InvalidStatus) as raw:  # the message, in Deepgram's header and body
                async with websockets.connect(f"ws://127.0.0.1:{srv.ws_port}/v1/listen?{urlencode(params, doseq=True)}"):
                    pass
            response = raw.value.response
            text = json.loads(response.body)["err_msg"]
            assert response.status_code == 400 and response.headers["dg-error"].startswith(tuple(params))
            assert message in text and text.startswith(tuple(params)), (params, text)
