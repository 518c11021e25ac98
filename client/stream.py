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
With a ``Resume`` (opt-in), ``stream_audio`` and ``stream_chunks`` also go on with a
stream cut mid-way: a new stream, the audio since the last final result sent again,
its results' times shifted so that they read as one stream.
It never imports server code.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
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


@dataclass(frozen=True)
class Resume:
    """Going on with a stream that is cut mid-way, on a new stream (opt-in).

    The client keeps the audio it has sent since the end of the last final result (that result's
    ``result_end_time``), at most ``keep_s`` seconds of it. When the stream ends with one of
    ``codes``, it opens a new stream with the same config (through a proxy or a round-robin
    channel, to another server), sends the kept audio again, as fast as it goes, and goes on with
    the rest. Final results received before the cut stand; the new stream's results have their
    times (``result_start_time``, ``result_end_time``, word offsets) shifted by where its audio
    starts in the whole stream, and their ``utterance_index`` by the utterances before, so the
    caller sees one stream. Codes: ``UNAVAILABLE`` (a server gone under the stream without a
    proxy, one that drained past its timeout, a new stream refused), ``CANCELLED`` (HAProxy's
    reset of a stream whose server died), ``INTERNAL`` (nginx's). The new stream's recogniser
    starts with a fresh state at the replay's start, which can change a word near it.

    Up to ``attempts`` new streams in a row that fail before their first response; ``pause_s``
    before the first, doubled before each next. A cut with more than ``keep_s`` of audio since
    the last final result is not resumed: the stream fails with the cut's status, and its details
    say why (``ResumeLimitError``). Without endpointing a stream has one final result, at its
    end, so all of its audio counts."""

    keep_s: float = 30.0
    attempts: int = 3
    pause_s: float = 0.05
    codes: tuple = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL)

    def pause(self, attempt: int) -> float:
        """Seconds to wait before new stream ``attempt`` (1 for the first after a cut)."""
        return self.pause_s * 2 ** (attempt - 1)


class ResumeLimitError(grpc.aio.AioRpcError):
    """A cut stream that ``Resume`` did not go on with: more audio since its last final result
    than it keeps. The status is the cut's."""

    def __init__(self, error: grpc.aio.AioRpcError, unfinished_s: float, keep_s: float):
        super().__init__(error.code(), error.initial_metadata(), error.trailing_metadata(),
                         f"{error.details()} (not resumed: {unfinished_s:.1f} s of audio since the last final "
                         f"result, more than the {keep_s:g} s kept)", error.debug_error_string())


class _Tape:
    """A stream's audio as it comes from its source, kept from the end of the last final result
    (``final``), at most about ``keep_bytes`` of it, so that a new stream can send it again
    (``read`` from that offset). Reading pulls the source on demand; a read cancelled mid-way
    (the call it fed ended) loses no chunk: the next read gets it."""

    def __init__(self, source: AsyncIterator[bytes], frame: int, keep_bytes: int):
        self.source = source.__aiter__()
        self.frame = frame
        self.keep_bytes = keep_bytes
        self.chunks: collections.deque[tuple[int, bytes]] = collections.deque()  # (offset, chunk)
        self.end = 0  # bytes taken from the source
        self.resume_at = 0  # end of the last final result
        self.ended = False
        self.pending: asyncio.Task | None = None

    @property
    def start(self) -> int:
        """Offset of the first byte kept."""
        return self.chunks[0][0] if self.chunks else self.end

    @property
    def resumable(self) -> bool:
        return self.start <= self.resume_at

    def final(self, end_s: float, bytes_per_second: int) -> None:
        """A final result ends at ``end_s``: the audio before it is no longer needed."""
        offset = min(self.end, int(round(end_s * bytes_per_second)) // self.frame * self.frame)
        self.resume_at = max(self.resume_at, offset)
        self._trim()

    def _trim(self) -> None:
        while self.chunks:
            offset, chunk = self.chunks[0]
            if offset + len(chunk) > self.resume_at and self.end - offset <= self.keep_bytes:
                break
            self.chunks.popleft()

    async def _next(self) -> bytes:
        return await self.source.__anext__()

    async def read(self, pos: int) -> AsyncIterator[bytes]:
        """The audio from offset ``pos`` on, then what the source gives, until it ends."""
        while True:
            if pos < self.end:
                assert pos >= self.start, (pos, self.start)
                offset, chunk = next((o, c) for o, c in self.chunks if o + len(c) > pos)
                piece = chunk[pos - offset:]
                pos += len(piece)
                yield piece
                continue
            if self.ended:
                return
            if self.pending is None:
                self.pending = asyncio.create_task(self._next())
            try:
                chunk = await asyncio.shield(self.pending)
            except StopAsyncIteration:
                self.pending, self.ended = None, True
                return
            except asyncio.CancelledError:
                if self.pending.done():
                    self.pending = None
                raise
            except BaseException:
                self.pending = None
                raise
            self.pending = None
            if chunk:
                self.chunks.append((self.end, bytes(chunk)))
                self.end += len(chunk)
                self._trim()

    def close(self) -> None:
        if self.pending is not None and not self.pending.done():
            self.pending.cancel()


def _shift(response: asr_pb2.StreamingRecognizeResponse, nanos: int, utterances: int) -> None:
    """Move ``response``'s results ``nanos`` later and ``utterances`` on (a resumed stream's)."""
    for result in response.results:
        for duration in (result.result_start_time, result.result_end_time):
            duration.FromNanoseconds(duration.ToNanoseconds() + nanos)
        for alternative in result.alternatives:
            for word in alternative.words:
                word.start_time.FromNanoseconds(word.start_time.ToNanoseconds() + nanos)
                word.end_time.FromNanoseconds(word.end_time.ToNanoseconds() + nanos)
        result.utterance_index += utterances


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
                    bytes_per_second: int, log: SendLog, sent: int = 0):
    """The config, then ``chunks``; ``sent``: the offset in the whole stream the first chunk starts at."""
    yield asr_pb2.StreamingRecognizeRequest(streaming_config=config)
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
                       resume: Resume | None = None,
                       on_resume: Callable[[grpc.aio.AioRpcError, float, int], None] | None = None,
                       ) -> AsyncIterator[StreamEvent]:
    """Stream LINEAR16 ``pcm`` and yield each response with its client-side timing.

    ``retry``: a stream that fails as ``Retry`` says starts again from the first sample on a new
    call (``send_log`` then starts over too); ``on_retry(error, attempt)`` hears of each retry.
    ``resume``: a stream cut as ``Resume`` says goes on on a new call (``stream_chunks``); it
    takes the place of ``retry`` (a stream refused before its first result is resumed from its
    first sample). The error of the last try, or of a stream that had responses, is raised."""
    bytes_per_second = sample_rate * 2 * channels
    frame = 2 * channels
    chunk_bytes = max(frame, int(bytes_per_second * options.chunk_ms / 1000) // frame * frame)
    log = send_log if send_log is not None else SendLog()
    if resume is not None:
        chunks = _paced(pcm, bytes_per_second, chunk_bytes, options.realtime)
        async for event in stream_chunks(stub, chunks, sample_rate, options, channels, metadata, log,
                                         resume=resume, on_resume=on_resume):
            yield event
        return
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
                        send_log: SendLog | None = None, resume: Resume | None = None,
                        on_resume: Callable[[grpc.aio.AioRpcError, float, int], None] | None = None,
                        ) -> AsyncIterator[StreamEvent]:
    """Stream LINEAR16 ``chunks`` as they come (whole samples each); half-close when they end.

    Yields each response with its client-side timing, until the server ends the stream.
    ``resume``: a stream cut as ``Resume`` says goes on on a new call, from the end of its last
    final result; ``on_resume(error, from_s, attempt)`` hears of each new call (``from_s``: where
    in the whole stream its audio starts).
    """
    log = send_log if send_log is not None else SendLog()
    bytes_per_second = sample_rate * 2 * channels
    config = options.config(sample_rate, channels)
    if resume is None:
        async for event in _call(stub, _requests(config, chunks, bytes_per_second, log), log, metadata):
            yield event
        return
    tape = _Tape(chunks, 2 * channels, int(resume.keep_s * sample_rate) * 2 * channels)
    start = 0  # where the current call's audio starts in the whole stream (bytes)
    utterances = 0  # utterances finished before it
    failures = 0  # new calls in a row that failed before their first response
    try:
        while True:
            try:
                async for event in _call(stub, _requests(config, tape.read(start), bytes_per_second, log, start),
                                         log, metadata, start * 1_000_000_000 // bytes_per_second, utterances):
                    failures = 0
                    for result in event.response.results:
                        if result.is_final:
                            tape.final(result.result_end_time.ToNanoseconds() / 1e9, bytes_per_second)
                            utterances = max(utterances, result.utterance_index + 1)
                    yield event
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in resume.codes or failures >= resume.attempts:
                    raise
                if not tape.resumable:
                    raise ResumeLimitError(exc, (tape.end - tape.resume_at) / bytes_per_second,
                                           resume.keep_s) from exc
                failures += 1
                start = tape.resume_at
                if on_resume is not None:
                    on_resume(exc, start / bytes_per_second, failures)
            await asyncio.sleep(resume.pause(failures))
            # the chunks after the replay's start are sent again: their times start over
            keep = bisect.bisect_right(log.chunk_end_s, start / bytes_per_second + 1e-9)
            del log.chunk_end_s[keep:], log.sent_at[keep:]
            log.finished_at = None
    finally:
        tape.close()


async def _call(stub: asr_pb2_grpc.SpeechRecognitionStub, requests, log: SendLog, metadata=None,
                shift_ns: int = 0, utterances: int = 0) -> AsyncIterator[StreamEvent]:
    """One StreamingRecognize call: its responses (shifted by ``shift_ns`` and ``utterances``,
    ``_shift``) with their client-side timing."""
    call = stub.StreamingRecognize(requests, metadata=metadata)
    try:
        async for response in call:
            now = time.monotonic()
            if shift_ns or utterances:
                _shift(response, shift_ns, utterances)
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
