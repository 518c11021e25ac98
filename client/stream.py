"""Streaming helper shared by ``asr-client``, the load tester and the benchmark.

``stream_audio`` sends a config and then audio chunks (real-time paced or as fast
as possible) over ``asr.v1.SpeechRecognition/StreamingRecognize`` and yields
``StreamEvent``s, each a response with client-side timing: when it arrived and,
for the chunk it covers, how long after the chunk's last byte was sent.
``stream_chunks`` does the same for a live source (microphone, browser): any
async iterator of LINEAR16 chunks; when it ends, the stream is half-closed.
It never imports server code.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import grpc
import numpy as np

from asr.v1 import asr_pb2, asr_pb2_grpc
from client.connection import Connection

CHUNK_MS = 160  # the model's segment; sending in these units gives the lowest latency
SAMPLE_RATE = 16000
RIGHT_CONTEXT_S = 0.04  # look-ahead the model needs beyond a result's end time


@dataclass
class StreamOptions:
    interim_results: bool = True
    decoding_method: int = asr_pb2.DECODING_METHOD_UNSPECIFIED
    beam_width: int = 0
    max_alternatives: int = 0
    word_time_offsets: bool = False
    endpointing: bool = True
    request_id: str = ""
    realtime: bool = True  # pace chunks at the audio's own rate
    chunk_ms: int = CHUNK_MS
    phrases: tuple[str, ...] = ()  # contextual biasing: one SpeechContext with these phrases
    boost: float = 0.0  # its boost (0: the server's default)

    def config(self, sample_rate: int, channels: int = 1) -> asr_pb2.StreamingRecognitionConfig:
        contexts = [asr_pb2.SpeechContext(phrases=list(self.phrases), boost=self.boost)] if self.phrases else []
        return asr_pb2.StreamingRecognitionConfig(
            config=asr_pb2.RecognitionConfig(
                encoding=asr_pb2.LINEAR16, sample_rate_hertz=sample_rate, audio_channel_count=channels,
                decoding_method=self.decoding_method, beam_width=self.beam_width,
                max_alternatives=self.max_alternatives, enable_word_time_offsets=self.word_time_offsets,
                endpointing=asr_pb2.EndpointingConfig(disabled=not self.endpointing), speech_contexts=contexts),
            interim_results=self.interim_results, request_id=self.request_id)


def decoding_method(greedy: bool = False, beam: int = 0) -> int:
    """The ``RecognitionConfig.decoding_method`` for a client's ``--greedy`` / ``--beam N`` flags
    (neither: the server's default)."""
    if greedy:
        return asr_pb2.GREEDY
    if beam:
        return asr_pb2.BEAM_SEARCH
    return asr_pb2.DECODING_METHOD_UNSPECIFIED


@dataclass
class StreamEvent:
    response: asr_pb2.StreamingRecognizeResponse
    received_at: float  # time.monotonic()
    # Client-side latency of the newest chunk this response covers: from sending that
    # chunk's last byte to this response's arrival (None when no chunk was covered).
    client_latency_s: float | None


@dataclass
class SendLog:
    """When each chunk's last byte was handed to gRPC, with the audio time it ends at."""

    chunk_end_s: list[float] = field(default_factory=list)
    sent_at: list[float] = field(default_factory=list)
    finished_at: float | None = None


def pcm16(samples: np.ndarray) -> bytes:
    """float samples in [-1, 1] -> LINEAR16 bytes (the exact inverse of int16 / 32768)."""
    return np.clip(np.round(np.asarray(samples, dtype=np.float64) * 32768), -32768, 32767).astype("<i2").tobytes()


async def _paced(audio: bytes, bytes_per_second: int, chunk_bytes: int, realtime: bool) -> AsyncIterator[bytes]:
    """``audio`` in ``chunk_bytes`` pieces, each released when its last sample is due (if ``realtime``)."""
    start = time.monotonic()
    for offset in range(0, len(audio), chunk_bytes):
        chunk = audio[offset:offset + chunk_bytes]
        if realtime:
            delay = start + (offset + len(chunk)) / bytes_per_second - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        yield chunk


async def _requests(config: asr_pb2.StreamingRecognitionConfig, chunks: AsyncIterator[bytes],
                    bytes_per_second: int, log: SendLog):
    yield asr_pb2.StreamingRecognizeRequest(streaming_config=config)
    sent = 0
    async for chunk in chunks:
        yield asr_pb2.StreamingRecognizeRequest(audio_content=chunk)
        sent += len(chunk)
        log.chunk_end_s.append(sent / bytes_per_second)
        log.sent_at.append(time.monotonic())
    log.finished_at = time.monotonic()


async def stream_audio(stub: asr_pb2_grpc.SpeechRecognitionStub, pcm: bytes, sample_rate: int,
                       options: StreamOptions, channels: int = 1, metadata=None,
                       send_log: SendLog | None = None) -> AsyncIterator[StreamEvent]:
    """Stream LINEAR16 ``pcm`` and yield each response with its client-side timing."""
    bytes_per_second = sample_rate * 2 * channels
    frame = 2 * channels
    chunk_bytes = max(frame, int(bytes_per_second * options.chunk_ms / 1000) // frame * frame)
    chunks = _paced(pcm, bytes_per_second, chunk_bytes, options.realtime)
    async for event in stream_chunks(stub, chunks, sample_rate, options, channels, metadata, send_log):
        yield event


async def stream_chunks(stub: asr_pb2_grpc.SpeechRecognitionStub, chunks: AsyncIterator[bytes],
                        sample_rate: int, options: StreamOptions, channels: int = 1, metadata=None,
                        send_log: SendLog | None = None) -> AsyncIterator[StreamEvent]:
    """Stream LINEAR16 ``chunks`` as they come (whole samples each); half-close when they end.

    Yields each response with its client-side timing, until the server ends the stream.
    """
    log = send_log if send_log is not None else SendLog()
    call = stub.StreamingRecognize(
        _requests(options.config(sample_rate, channels), chunks, sample_rate * 2 * channels, log),
        metadata=metadata)
    try:
        async for response in call:
            now = time.monotonic()
            latency = None
            if response.results and log.sent_at:
                end = response.results[0].result_end_time
                needed = end.seconds + end.nanos / 1e9 + RIGHT_CONTEXT_S - 1e-6
                # The chunk that delivered the last sample this result needed (right context
                # included); past the end of the audio, the last chunk.
                idx = bisect.bisect_left(log.chunk_end_s, needed)
                latency = now - log.sent_at[min(idx, len(log.sent_at) - 1)]
            yield StreamEvent(response, now, latency)
    finally:
        if not call.done():  # the caller stopped listening (cancelled, or closed the iterator)
            call.cancel()


def channel(target: str | Connection, options: list | None = None) -> grpc.aio.Channel:
    """An aio channel to ``target``: a HOST:PORT (plaintext) or a ``client.connection.Connection``
    (TLS, client certificate, bearer token)."""
    return (target if isinstance(target, Connection) else Connection(target)).channel(options)
