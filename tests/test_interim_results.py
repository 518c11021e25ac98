"""Interim results carry information: never empty, and a stability that says how settled they are."""

from __future__ import annotations

import pytest

from asr.v1 import asr_pb2
from client.stream import StreamOptions, pcm16, stream_audio
from server.model.loading import load_demo
from tests.conftest import running_server


@pytest.fixture(scope="module")
async def demo_server():
    async with running_server(model=load_demo()) as pair:
        yield pair


@pytest.mark.parametrize("method", [asr_pb2.GREEDY, asr_pb2.BEAM_SEARCH])
async def test_interims_are_never_empty_and_their_stability_grows_as_words_settle(demo_server, speech, method):
    _, stub = demo_server
    options = StreamOptions(realtime=False, interim_results=True, decoding_method=method,
                            beam_width=4 if method == asr_pb2.BEAM_SEARCH else 0)
    interims, finals = [], []
    for _, audio, _ in speech:
        history: list[list[str]] = []
        async for event in stream_audio(stub, pcm16(audio), 16000, options):
            for r in event.response.results:
                if r.is_final:
                    finals.append(r)
                    history = []
                    continue
                words = r.alternatives[0].transcript.split()
                assert words, "an interim result must carry text"
                assert 0 < r.stability <= 1
                if method == asr_pb2.GREEDY and len(history) >= 2 and history[-1] == history[-2] == words:
                    assert r.stability == pytest.approx(1.0), "words that stood for three results are settled"
                if len(history) >= 2 and any(h[:1] != words[:1] for h in history[-2:]):
                    assert r.stability <= 0.1 + 1e-6, "nothing has settled while the first word still changes"
                history.append(words)
                interims.append(r.stability)
    assert finals and all(r.stability == 1.0 for r in finals)
    assert len(interims) > 10 and len({round(s, 3) for s in interims}) > 3, "stability must vary with the text"
    assert min(interims) < 0.5 < max(interims)
