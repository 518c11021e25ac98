"""Small helpers for driving a real server from tests through the real client code."""

from __future__ import annotations

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


async def transcript(stub, audio: np.ndarray, **options) -> str:
    """Whole-stream transcript (endpointing off unless asked): the finals joined."""
    options.setdefault("endpointing", False)
    finals = await final_results(stub, audio, **options)
    return " ".join(r.alternatives[0].transcript for r in finals if r.alternatives[0].transcript)


def beam_options(width: int) -> dict:
    return {"decoding_method": asr_pb2.BEAM_SEARCH, "beam_width": width}


GREEDY = {"decoding_method": asr_pb2.GREEDY}
