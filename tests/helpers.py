"""Small helpers for driving a real server from tests through the real client code."""

from __future__ import annotations

import asyncio

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
