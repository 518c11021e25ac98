"""One recognition stream: audio in, results out, with its own state and lifecycle.

A ``Session`` owns everything per stream: the audio decoder (bytes -> 16 kHz
mono, resampled), the sample buffer it cuts into model windows, the engine's
``StreamState`` (left-context slot, decoder hypotheses), endpointing counters
and timing. Transport-free: servicers of every protocol feed it audio and turn
its ``Result`` objects into their own messages.

Lifecycle (``SessionState``): OPEN (waiting for a config) -> ACTIVE (audio and
results) -> DRAINING (input finished, last windows being recognised) ->
CLOSED. ``close()`` runs on every exit path (end, error, client cancel) and
frees the engine state exactly once. ``end_input(status)`` ends a stream early
but gracefully (duration limit, idle timeout, server drain): what was received
is recognised, the final result delivered, then ``results`` raises ``status``.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import itertools
import logging
import sys
import time
from dataclasses import dataclass
from typing import AsyncIterator

import numpy as np

from server.config import ServerSettings
from server.core.admission import Admission
from server.core.audio import AudioDecoder
from server.core.pace import AudioPace
from server.core.scheduler import JobTiming, Scheduler
from server.errors import ASRError, ErrorCode, invalid
from server.model.context_graph import PhraseError
from server.model.engine import (FRAME_SECONDS, MAX_CHUNKS_PER_STREAM, ChunkResult, ChunkWork, Endpoint, Engine,
                                 StreamState)
from server.model.vocabulary import TokenTable
from server.observability.observer import Observer
from server.types import (SAMPLE_RATE, SEGMENT_SAMPLES, WINDOW_SAMPLES, Alternative, FinalTrigger, LimitReason,
                          Result, StreamConfig, StreamOutcome, StreamStats, WordTiming, outcome_of)

log = logging.getLogger(__name__)

DECODE_PIECE_SECONDS = 1.0  # of a message's audio decoded at a time: a large message never becomes a large array
AHEAD_SLACK_S = 0.5  # a client may run this far ahead of real time (e.g. in 0.5 s messages) and still rank as real time
INTERIMS_FOR_STABILITY = 2  # earlier interim results a word must have stood in to count as stable


class SessionState(enum.Enum):
    OPEN = "open"
    ACTIVE = "active"
    DRAINING = "draining"
    CLOSED = "closed"


@dataclass
class _Window:
    samples: np.ndarray
    ready_at: float  # when its last sample arrived
    due_at: float = 0.0  # when it would have, at real-time pace (less AHEAD_SLACK_S): scheduler fairness


class Session:
    _ids = itertools.count(1)

    def __init__(self, engine: Engine, scheduler: Scheduler, settings: ServerSettings, api: str = "asr.v1",
                 observer: Observer | None = None, client: str = ""):
        self.id = next(self._ids)
        self.api = api
        self.client = client  # whom --max-streams-per-client charges (``server.api.status.client_of``)
        self.observer = observer or Observer()
        self.engine = engine
        self.tokens: TokenTable = engine.tokens
        self.scheduler = scheduler
        self.settings = settings
        self.state = SessionState.OPEN
        self.config: StreamConfig | None = None
        self.stats = StreamStats()
        self.error: BaseException | None = None  # what ended ``results`` early, if anything
        self.completed = False  # ``results`` delivered everything
        self._audio_reported = 0.0  # seconds of audio reported to the observer as recognised
        self._at_end = False  # the end-of-stream final is being delivered
        self._decoder: AudioDecoder | None = None
        self._stream: StreamState | None = None
        self._buffer = np.zeros(0, dtype=np.float32)
        self._samples_in = 0  # 16 kHz samples decoded
        self._frames_in = 0  # sample frames received, at the client's rate
        # audio received but not decoded yet, oldest first: (whole frames, arrival time); decoded
        # piece by piece while less than --max-buffered-seconds waits for recognition
        self._pending: collections.deque[tuple[memoryview, float]] = collections.deque()
        self._finishing = False  # input is complete; the windows are cut once ``_pending`` is decoded
        self._decoding = False  # ``_decode_pending`` is running (it re-enters through ``_top_up``)
        # windows not yet handed to the scheduler (in order), waiting for room in ``_in_flight``
        self._windows: collections.deque[_Window] = collections.deque()
        self._input_done = False  # every window is cut (the client half-closed, or the stream ended)
        self._failure: ASRError | None = None  # raised by ``results`` once the windows before it are done
        self._changed = asyncio.Event()  # a window, the end of input or a failure arrived
        self._room = asyncio.Event()
        self._room.set()
        self._utterance_index = 0
        # the words of this utterance's last interim results, for their stability (``_stability``)
        self._recent_interims: collections.deque[list[str]] = collections.deque(maxlen=INTERIMS_FOR_STABILITY)
        self._last: tuple[ChunkResult, JobTiming] | None = None
        # chunks queued on the scheduler, oldest first: every window that is ready, up to
        # MAX_CHUNKS_PER_STREAM, so that a stream that is behind catches up in one step
        self._in_flight: collections.deque[tuple[asyncio.Future, JobTiming]] = collections.deque()
        self._end_status: ASRError | None = None  # raised after the final result (``end_input``)
        self.ending = asyncio.Event()  # set by ``end_input``: stop waiting for the client
        # idle deadline and engine share from the audio actually arriving (--min-audio-rate)
        self.pace = AudioPace(self.stats.opened_at, settings.idle_timeout_seconds, settings.min_audio_rate)

    # --- input ---------------------------------------------------------------------------
    def start(self, config: StreamConfig) -> None:
        if self.state is not SessionState.OPEN:
            raise ASRError(ErrorCode.INVALID_ARGUMENT, "the stream configuration was already sent; "
                           "later messages must carry audio only")
        self.config = config.validate(self.settings)
        self._decoder = AudioDecoder(self.config)
        if not self.config.speech_contexts:
            self._stream = self.engine.new_stream(self.config.decoding_method, self.config.beam_width,
                                                  self.config.endpointing)
        else:
            try:
                phrases = self.engine.context_phrases(self.config.phrases)
            except PhraseError as exc:
                raise invalid(f"speech_contexts: {exc}") from None
            # the automaton takes time in proportion to the phrases' characters: built off the event
            # loop; the stream's windows wait for it (``_top_up`` needs the stream's state)
            built = asyncio.get_running_loop().run_in_executor(None, self.engine.context_graph, phrases)
            built.add_done_callback(self._context_built)
        self.state = SessionState.ACTIVE

    def _context_built(self, built: asyncio.Future) -> None:
        if self.state is SessionState.CLOSED or built.cancelled():
            return
        if built.exception() is not None:
            log.error("stream %d: building its phrases failed: %r", self.id, built.exception())
            self.fail(ASRError(ErrorCode.INTERNAL, "the stream's phrases could not be prepared"))
            return
        self._stream = self.engine.new_stream(self.config.decoding_method, self.config.beam_width,
                                              self.config.endpointing, built.result())
        self._top_up()
        self._changed.set()

    @property
    def buffered_seconds(self) -> float:
        """Decoded audio not yet recognised (audio still waiting to be decoded not included)."""
        windows = len(self._windows) + len(self._in_flight)
        return (windows * SEGMENT_SAMPLES + len(self._buffer)) / SAMPLE_RATE

    def feed(self, data: bytes) -> None:
        """Append one audio message; raises ``ASRError`` for malformed audio or limits."""
        if self.state is SessionState.OPEN:
            raise ASRError(ErrorCode.INVALID_ARGUMENT, "the first message must carry the stream "
                           "configuration, before any audio")
        if self._end_status is not None:
            return  # the server ended the stream (drain, a limit): it ends with that status, not this audio's
        if self.state is not SessionState.ACTIVE:
            raise ASRError(ErrorCode.FAILED_PRECONDITION, "audio after the end of input")
        frames = self._decoder.frames(data)
        rate = self.config.sample_rate_hertz
        now = time.monotonic()
        self.pace.audio(now, frames / rate)
        if self.stats.first_audio_at is None:
            self.stats.first_audio_at = now
        allowed = max(0, round(self.settings.max_stream_seconds * rate) - self._frames_in)
        if min(frames, allowed):
            self._pending.append((memoryview(data)[:min(frames, allowed) * self._decoder.frame_bytes], now))
            self._frames_in += min(frames, allowed)
            self._decode_pending()
        if frames > allowed:  # recognise up to the limit, deliver the final, then OUT_OF_RANGE
            self.observer.limit_hit(LimitReason.MAX_STREAM_SECONDS)
            self.end_input(ASRError(ErrorCode.OUT_OF_RANGE, f"the stream exceeds the maximum duration of "
                                    f"{self.settings.max_stream_seconds:g} s of audio (--max-stream-seconds); "
                                    f"it was ended after the final result of its first "
                                    f"{self.settings.max_stream_seconds:g} s"))
            return
        if (self._pending or self.buffered_seconds > self.settings.max_buffered_seconds) and self._room.is_set():
            self.observer.limit_hit(LimitReason.MAX_BUFFERED_SECONDS)
            self._room.clear()

    def _decode_pending(self) -> None:
        """Decode received audio, a piece at a time, while less than ``--max-buffered-seconds``
        waits for recognition; once all is decoded after the end of input, cut the last windows."""
        if self._decoding or self._decoder is None:
            return
        self._decoding = True
        try:
            piece_frames = max(1, round(DECODE_PIECE_SECONDS * self.config.sample_rate_hertz))
            piece_bytes = piece_frames * self._decoder.frame_bytes
            while self._pending and self.buffered_seconds <= self.settings.max_buffered_seconds:
                data, arrived = self._pending[0]
                if len(data) > piece_bytes:
                    self._pending[0] = (data[piece_bytes:], arrived)
                    data = data[:piece_bytes]
                else:
                    self._pending.popleft()
                self._append(self._decoder.decode(data), arrived)
            if self._finishing and not self._pending and not self._input_done:
                self._cut_last_windows()
        finally:
            self._decoding = False

    @property
    def has_room(self) -> bool:
        """Whether the audio ahead of recognition is under ``--max-buffered-seconds``."""
        return self._room.is_set()

    async def wait_for_room(self) -> None:
        """Wait until the audio ahead of recognition is under the limit (backpressure)."""
        await self._room.wait()

    def _append(self, samples: np.ndarray, now: float) -> None:
        if len(samples):
            self._buffer = np.concatenate([self._buffer, samples]) if len(self._buffer) else samples
            self._samples_in += len(samples)
        while len(self._buffer) >= WINDOW_SAMPLES:  # a copy: no window keeps a large decoded piece alive
            self._add_window(_Window(self._buffer[:WINDOW_SAMPLES].copy(), now, self._due_at()))
            self._buffer = self._buffer[SEGMENT_SAMPLES:]

    def _due_at(self) -> float:
        """When the window now being cut would have been complete had the audio come in real time."""
        start = self._samples_in - len(self._buffer)  # the window's first sample
        return (self.stats.first_audio_at or 0.0) + (start + WINDOW_SAMPLES) / SAMPLE_RATE - AHEAD_SLACK_S

    def finish_input(self) -> None:
        """The client half-closed: recognise what is left (decoding what is pending), zero-padded."""
        if self.state is not SessionState.ACTIVE:
            return
        self.stats.input_finished_at = time.monotonic()
        self.state = SessionState.DRAINING
        self._finishing = True
        self._decode_pending()  # cuts the last windows now, or once the audio still pending is decoded

    def _cut_last_windows(self) -> None:
        now = time.monotonic()
        self._append(self._decoder.flush(), now)
        # Windows start every 2560 samples; the last ones are zero-padded (torchaudio's rule).
        windows_total = -(-self._samples_in // SEGMENT_SAMPLES)
        windows_queued = (self._samples_in - len(self._buffer)) // SEGMENT_SAMPLES
        for _ in range(windows_total - windows_queued):
            window = np.zeros(WINDOW_SAMPLES, dtype=np.float32)
            window[:min(len(self._buffer), WINDOW_SAMPLES)] = self._buffer[:WINDOW_SAMPLES]
            self._add_window(_Window(window, now, self._due_at()))
            self._buffer = self._buffer[SEGMENT_SAMPLES:]
        self._buffer = np.zeros(0, dtype=np.float32)
        self._input_done = True
        self._changed.set()

    def end_input(self, status: ASRError) -> bool:
        """End the stream early, gracefully: recognise the audio received so far (``finish_input``),
        deliver the final result, then end ``results`` with ``status``. A session that has no
        config yet ends with ``status`` at once; one whose input is complete ends as it would
        have. Idempotent: the first status wins. Returns whether this call ended the stream."""
        if self.state not in (SessionState.OPEN, SessionState.ACTIVE) or self._end_status is not None:
            return False
        self._end_status = status
        self.ending.set()
        if self.state is SessionState.OPEN:
            self.fail(status)
        else:
            self.finish_input()
        return True

    @property
    def end_status(self) -> ASRError | None:
        """The status ``end_input`` ended the stream with, if it did."""
        return self._end_status

    @property
    def accepting_audio(self) -> bool:
        """Whether the stream still reads audio (configured, not ended)."""
        return self.state is SessionState.ACTIVE

    def fail(self, error: ASRError) -> None:
        """Stop the stream with ``error`` (raised from ``results``)."""
        if self._failure is None:
            self._failure = error
        self._changed.set()

    # --- output --------------------------------------------------------------------------
    async def results(self) -> AsyncIterator[Result]:
        """Recognise windows as they come; yields interim and final results. Raises ``ASRError``."""
        try:
            async for result in self._recognise():
                now = time.monotonic()
                if self.stats.first_result_at is None:
                    self.stats.first_result_at = now
                    self.observer.first_result(self.api, now - (self.stats.first_audio_at or self.stats.opened_at))
                if result.is_final:
                    if self._at_end:
                        self.observer.final_result(self.api, FinalTrigger.END_OF_STREAM,
                                                   now - self.stats.input_finished_at)
                    else:
                        self.observer.final_result(self.api, FinalTrigger.ENDPOINT, now - result.chunk_ready_at)
                yield result
            if self._end_status is not None:
                raise self._end_status
        except BaseException as exc:
            self.error = exc
            raise
        self.completed = True

    def _add_window(self, window: _Window) -> None:
        """A window is complete: to the scheduler at once if there is room (so that it can join
        the very next step), else it waits its turn."""
        self._windows.append(window)
        self._top_up()
        self._changed.set()

    def _top_up(self) -> None:
        """Hand waiting windows to the scheduler, in order, up to ``MAX_CHUNKS_PER_STREAM`` in
        flight: the engine runs a stream's consecutive chunks in one step."""
        while self._windows and len(self._in_flight) < MAX_CHUNKS_PER_STREAM and self._stream is not None:
            self._in_flight.append(self._submit(self._windows.popleft()))
        if self._pending:
            self._decode_pending()
        if not self._pending and self.buffered_seconds <= self.settings.max_buffered_seconds:
            self._room.set()

    async def _recognise(self) -> AsyncIterator[Result]:
        try:
            while True:
                self._top_up()
                if not self._in_flight:
                    if self._failure is not None:
                        raise self._failure
                    if self._input_done and not self._windows:  # (windows wait while phrases are built)
                        break
                    self._changed.clear()
                    await self._changed.wait()
                    continue
                future, timing = self._in_flight[0]
                chunk = await future
                self._in_flight.popleft()
                self._top_up()  # a stream that is behind queues its next chunk before the result goes out
                self._last = (chunk, timing)
                self.stats.chunks += 1
                self.stats.compute_seconds += timing.compute / max(1, timing.batch_size)
                self.stats.audio_seconds = self._samples_in / SAMPLE_RATE
                audio_done = min(self.stats.chunks * SEGMENT_SAMPLES, self._samples_in) / SAMPLE_RATE
                self.observer.chunk_done(self.api, time.monotonic() - timing.ready_at, timing.queue_wait,
                                         audio_done - self._audio_reported)
                self._audio_reported = audio_done
                result = self._on_chunk(chunk, timing)
                if result is not None:
                    yield result
        finally:
            self._withdraw_in_flight()
        self.stats.audio_seconds = self._samples_in / SAMPLE_RATE
        if self._last is not None:
            chunk, timing = self._last
            if chunk.best.tokens and chunk.endpoint is None:
                self._at_end = True
                yield self._final(chunk, timing)

    def _withdraw_in_flight(self) -> None:
        """Cancel the queued chunks: withdrawn unless a batch has taken them."""
        while self._in_flight:
            self._in_flight.popleft()[0].cancel()

    def _submit(self, window: "_Window") -> tuple[asyncio.Future, JobTiming]:
        """Queue ``window`` on the scheduler now (in this stream's order): the future resolves to
        the chunk's result (cancel it to withdraw the chunk), the timing fills in as it runs."""
        return self.scheduler.enqueue(self.id, ChunkWork(self._stream, window.samples), ready_at=window.ready_at,
                                      due_at=window.due_at)

    def _audio_end_s(self, frames_done: int) -> float:
        return min(frames_done * FRAME_SECONDS, self._samples_in / SAMPLE_RATE)

    def _on_chunk(self, chunk: ChunkResult, timing: JobTiming) -> Result | None:
        """A final result where the engine's endpointing ended the utterance, else an interim one."""
        if chunk.endpoint is Endpoint.FINAL:
            return self._final(chunk, timing)
        if chunk.endpoint is Endpoint.RESTART or not self.config.interim_results:
            return None  # non-speech only: the utterance restarts quietly
        if not chunk.alternatives or not chunk.alternatives[0].tokens:
            return None  # nothing recognised yet: no empty interim
        return self._result(chunk, timing, is_final=False)

    def _final(self, chunk: ChunkResult, timing: JobTiming) -> Result:
        result = self._result(chunk, timing, is_final=True)
        self._utterance_index += 1
        self._recent_interims.clear()
        return result

    def _stability(self, text: str, agreement: float) -> float:
        """How likely an interim result is to survive, in [0.1, 1]: the share of its words that the
        ``INTERIMS_FOR_STABILITY`` interims before it already had in the same places (a word that
        has stood for several chunks rarely changes again; the word being spoken does), times
        ``agreement`` (beam search: the share of the best hypothesis every hypothesis agrees on; 1
        for greedy), mapped to [0.1, 1]."""
        words = text.split()
        stable = 0
        if len(self._recent_interims) == self._recent_interims.maxlen and words:
            stable = min(next((i for i, (a, b) in enumerate(zip(words, earlier)) if a != b),
                              min(len(words), len(earlier))) for earlier in self._recent_interims)
        self._recent_interims.append(words)
        return 0.1 + 0.9 * agreement * stable / max(1, len(words))

    def _result(self, chunk: ChunkResult, timing: JobTiming, is_final: bool) -> Result:
        cfg = self.config
        n = cfg.max_alternatives if is_final else 1
        alternatives = []
        for alt in chunk.alternatives[:n]:
            words = []
            if cfg.word_time_offsets:
                words = [WordTiming(w.text, w.first_frame * FRAME_SECONDS,
                                    self._audio_end_s(w.last_frame + 1))
                         for w in self.tokens.words(list(alt.tokens), list(alt.frames))]
            alternatives.append(Alternative(self.tokens.text(list(alt.tokens)),
                                            alt.confidence if is_final else 0.0, words))
        stability = 1.0 if is_final else self._stability(alternatives[0].transcript, chunk.stability)
        return Result(alternatives, is_final, stability,
                      chunk.utterance_start_frame * FRAME_SECONDS, self._audio_end_s(chunk.frames_done),
                      self._utterance_index, timing.ready_at, timing.queue_wait, timing.compute,
                      timing.batch_size)

    # --- teardown ------------------------------------------------------------------------
    def close(self) -> None:
        """Free the stream's engine state (idempotent; safe on every exit path)."""
        if self.state is SessionState.CLOSED:
            return
        self.state = SessionState.CLOSED
        self._withdraw_in_flight()  # a queued chunk must not run after the stream's state is freed
        self._windows.clear()
        self._pending.clear()
        self._buffer = np.zeros(0, dtype=np.float32)
        if self._stream is not None:
            stream, self._stream = self._stream, None
            self.scheduler.call_soon_on_engine_thread(self.engine.release, stream)


class SessionManager:
    """Admission (``server.core.admission``) and bookkeeping of live sessions; ending them all (drain)."""

    def __init__(self, engine: Engine, scheduler: Scheduler, settings: ServerSettings,
                 observer: Observer | None = None):
        self.engine = engine
        self.scheduler = scheduler
        self.settings = settings
        self.observer = observer or Observer()
        self.live: dict[int, Session] = {}
        self.draining = False  # set on SIGTERM: new streams get UNAVAILABLE
        self._per_client: dict[str, int] = {}  # live sessions per client key (non-empty keys only)
        self.admission = Admission(max_streams=settings.max_streams, max_batch=settings.max_batch,
                                   latency_budget_s=settings.latency_budget_ms / 1000,
                                   max_streams_per_client=settings.max_streams_per_client)

    @property
    def active(self) -> int:
        return len(self.live)

    def open(self, api: str = "asr.v1", client: str = "") -> Session:
        """A new session for ``client`` (its quota key), or ``ASRError`` at once when admission
        refuses it (counted by reason)."""
        now = time.monotonic()
        refusal = self.admission.check(len(self.live), draining=self.draining,
                                       queue_depth=self.scheduler.queued_streams,
                                       load=sum(s.pace.load(now) for s in list(self.live.values())),
                                       client_streams=self._per_client.get(client, 0) if client else 0)
        if refusal is not None:
            self.reject(api, refusal.reason)
            raise refusal.error
        session = Session(self.engine, self.scheduler, self.settings, api, self.observer, client)
        self.live[session.id] = session
        if client:
            self._per_client[client] = self._per_client.get(client, 0) + 1
        return session

    def reject(self, api: str, reason: LimitReason) -> None:
        """Report a stream refused at admission (the caller raises the error)."""
        self.observer.limit_hit(reason)
        self.observer.stream_ended(api, StreamOutcome.REJECTED, None)

    def active_by_api(self) -> dict[str, int]:
        """Live sessions per protocol."""
        counts: dict[str, int] = {}
        for session in list(self.live.values()):  # also read by metrics scrapes on another thread
            counts[session.api] = counts.get(session.api, 0) + 1
        return counts

    def close(self, session: Session, error: BaseException | None = None) -> None:
        """Free ``session`` and report how it ended (once): ``error`` when given, else OK if its
        results were all delivered, else the error the session recorded, else the exception
        propagating through the caller (call this from a ``finally`` block), else CANCELLED."""
        session.close()
        if self.live.pop(session.id, None) is None:
            return
        if session.client:
            left = self._per_client.pop(session.client) - 1
            if left:
                self._per_client[session.client] = left
        if error is None and not session.completed:
            error = session.error or sys.exc_info()[1] or asyncio.CancelledError()
        self.observer.stream_ended(session.api, outcome_of(error), session.stats)

    def end_all(self, status: ASRError, reason: LimitReason) -> int:
        """End every live stream still reading audio: each gets its final result, then ``status``;
        each is counted as a ``reason`` limit hit. Returns how many were ended."""
        ended = 0
        for session in list(self.live.values()):
            if session.end_input(status):
                self.observer.limit_hit(reason)
                ended += 1
        return ended

    async def wait_until_empty(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every session to end; whether they did."""
        deadline = time.monotonic() + timeout
        while self.live and time.monotonic() < deadline:
            await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        return not self.live
