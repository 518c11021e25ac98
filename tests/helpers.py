"""Small helpers for driving a real server from tests through the real client code."""

from __future__ import annotations

import asyncio
import random

import numpy as np

from asr.v1 import asr_pb2
from client.stream import StreamOptions, pcm16, stream_audio


async def final_results(stub, audio: np.ndarray, rate: int = 16000, **options) -> list:
    """Stream ``audio`` as fast as possible; return the final StreamingRecognitionResults."""
    opts = StreamOptions(realtime=False, interim_results=False, **options)
    finals = []
    async for event in stream_audio(stub, pcm16(audio), rate, opts):
        finals += [r for r in event.response.results if r.is_final]
    return finals


async def final_words(stub, audio: np.ndarray, options: dict, delay: float = 0.0,
                      batch_sizes: list | None = None) -> list:
    """(transcript, word timings in ns) of each final of one stream sent as fast as possible after
    ``delay`` seconds; ``batch_sizes`` collects every result's step batch size."""
    await asyncio.sleep(delay)
    opts = StreamOptions(realtime=False, interim_results=True, endpointing=False, word_time_offsets=True, **options)
    final = []
    async for event in stream_audio(stub, pcm16(audio), 16000, opts):
        for r in event.response.results:
            if batch_sizes is not None:
                batch_sizes.append(r.timing.batch_size)
            if r.is_final:
                alt = r.alternatives[0]
                final.append((alt.transcript, [(w.word, w.start_time.ToNanoseconds(), w.end_time.ToNanoseconds())
                                               for w in alt.words]))
    return final


async def transcript(stub, audio: np.ndarray, **options) -> str:
    """Whole-stream transcript (endpointing off unless asked): the finals joined."""
    options.setdefault("endpointing", False)
    finals = await final_results(stub, audio, **options)
    return " ".join(r.alternatives[0].transcript for r in finals if r.alternatives[0].transcript)


def beam_options(width: int) -> dict:
    return {"decoding_method": asr_pb2.BEAM_SEARCH, "beam_width": width}


GREEDY = {"decoding_method": asr_pb2.GREEDY}


async def assert_staggered_streams_equal_solo(stub, waves: list[np.ndarray], options: dict, min_chars: int) -> None:
    """Each of ``waves`` alone, then all at once with staggered starts (0-40 ms apart): every
    stream's final words and offsets must be the same both ways, at least ``min_chars`` of text must
    come out, and the streams must have shared steps of 4 or more."""
    solo = [await final_words(stub, a, options) for a in waves]
    assert sum(len(t) for s in solo for t, _ in s) > min_chars, "the model should emit text"
    rng = random.Random(7)
    delays = [i * 0.02 + rng.random() * 0.02 for i in range(len(waves))]
    sizes: list[int] = []
    together = await asyncio.gather(*(final_words(stub, a, options, d, sizes) for a, d in zip(waves, delays)))
    assert max(sizes) >= 4, f"streams were never batched together (batch sizes {sorted(set(sizes))})"
    for i, (alone, batched) in enumerate(zip(solo, together)):
        assert batched == alone, f"stream {i} changed when batched"
