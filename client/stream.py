"""Streaming helper shared by ``asr-client``, the load tester and the benchmark.

``stream_audio`` sends a config and then audio chunks (real-time paced or as fast
as possible) over ``asr.v1.SpeechRecognition/StreamingRecognize`` and yields
``StreamEvent``s, each a response with client-side timing: when it arrived and,
for the chunk it covers, how long after the chunk's last byte was sent.
``stream_chunks`` does the same for a live source (microphone, browser): any
async iterator of LINEAR16 chunks; when it ends, the stream is half-closed.
With a ``Retry``, ``stream_audio`` tries a new stream again when it fails with
``UNAVAILABLE`` before its first response (a server that drains, stopped or
cannot be reached): on a channel to several servers the next try goes to another.
It never imports server code.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

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


@dataclass(frozen=True)
class Retry:
    """When and how often a new stream is tried again.

    Only a stream that ended with one of ``codes`` before its first response: the server
    recognised none of its audio, so sending it all again on a new stream loses and repeats
    nothing. ``UNAVAILABLE`` is what a draining server answers a new stream, and what a stream
    gets from a server that stopped or cannot be reached; a refusal for load
    (``RESOURCE_EXHAUSTED``) is not retried. Up to ``attempts`` more tries, ``pause_s`` before
    the first of them, doubled before each next one."""

    attempts: int = 3
    pause_s: float = 0.1
    codes: tuple = (grpc.StatusCode.UNAVAILABLE,)

    def pause(self, attempt: int) -> float:
        """Seconds to wait before try ``attempt`` (1 for the first retry)."""
        return self.pause_s * 2 ** (attempt - 1)


NO_RETRY = Retry(attempts=0)


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
                       send_log: SendLog | None = None, retry: Retry = NO_RETRY,
                       on_retry: Callable[[grpc.aio.AioRpcError, int], None] | None = None,
                       ) -> AsyncIterator[StreamEvent]:
    """Stream LINEAR16 ``pcm`` and yield each response with its client-side timing.

    ``retry``: a stream that fails as ``Retry`` says starts again from the first sample on a new
    call (``send_log`` then starts over too); ``on_retry(error, attempt)`` hears of each retry.
    The error of the last try, or of a stream that had responses, is raised."""
    bytes_per_second = sample_rate * 2 * channels
    frame = 2 * channels
    chunk_bytes = max(frame, int(bytes_per_second * options.chunk_ms / 1000) // frame * frame)
    log = send_log if send_log is not None else SendLog()
    attempt = 0
    while True:
        answered = False
        chunks = _paced(pcm, bytes_per_second, chunk_bytes, options.realtime)
        try:
            async for event in stream_chunks(stub, chunks, sample_rate, options, channels, metadata, log):
                answered = True
                yield event
            return
        except grpc.aio.AioRpcError as exc:
            if answered or attempt >= retry.attempts or exc.code() not in retry.codes:
                raise
            attempt += 1
            if on_retry is not None:
                on_retry(exc, attempt)
        await asyncio.sleep(retry.pause(attempt))
        log.chunk_end_s.clear()
        log.sent_at.clear()
        log.finished_at = None


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
