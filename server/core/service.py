"""The transport-free core every protocol adapter drives: model, engine, scheduler, sessions.

``RecognitionService`` is built once per server. Servicers (``asr.v1`` and the
compatibility protocols) convert their messages to a ``StreamConfig`` via
``stream_config``, open a ``Session`` through ``sessions``, and convert the
session's ``Result`` objects back. There is exactly one recognition path.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
import logging
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from server import __version__
from server.config import ServerSettings
from server.core.scheduler import Scheduler, engine_thread
from server.core.session import Session, SessionManager
from server.core.threads import ThreadGovernor
from server.model.engine import MAX_CHUNKS_PER_STREAM, ChunkWork, Engine
from server.model.loading import LoadedModel
from server.observability.observer import Observer, first_step_stats
from server.types import (RIGHT_CONTEXT_SAMPLES, SAMPLE_RATE, SEGMENT_SAMPLES, WINDOW_SAMPLES, BatchRecord,
                          DecodingMethod, Encoding, Endpointing, Result, SpeechContext,
                          StreamConfig)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelDescription:
    model_name: str
    precision: str
    device: str
    vocabulary_size: int
    num_parameters: int
    kernels: str = "torch"
    batching_exact: bool = False
    chunk_ms: float = SEGMENT_SAMPLES * 1000 / SAMPLE_RATE
    right_context_ms: float = RIGHT_CONTEXT_SAMPLES * 1000 / SAMPLE_RATE
    sample_rate_hertz: int = SAMPLE_RATE
    version: str = __version__


class RecognitionService:
    def __init__(self, settings: ServerSettings, model: LoadedModel, observer: Observer | None = None,
                 executor: ThreadPoolExecutor | None = None):
        """Builds the engine in the calling thread: call it on ``executor``, the inference thread
        (``server.core.scheduler.engine_thread``) that will run every engine step."""
        self.settings = settings
        self.model = model
        self.executor = executor or engine_thread()  # handed to the scheduler, which owns it
        self.observer = observer or Observer()  # receives the hot path's stats (see server.observability.observer)
        self.engine = Engine(model, device=settings.device, precision=settings.precision,
                             threads=settings.threads, int8_kernel=settings.int8_kernel,
                             max_symbols_per_frame=settings.max_symbols_per_frame,
                             beam_search=settings.beam_search, kernels=settings.kernels)
        self.engine.check_batching()
        # --threads 0: one per core, or 1 while another process slows every step (server.core.threads)
        self.threads = (ThreadGovernor(self.engine.threads, self._set_threads)
                        if settings.threads == 0 and settings.device == "cpu" and self.engine.threads > 1 else None)
        self.scheduler = Scheduler(self.engine, max_batch=settings.max_batch,
                                   max_wait=settings.max_wait_ms / 1000,
                                   on_batch=self._batch_done, executor=self.executor,
                                   max_chunks_per_stream=MAX_CHUNKS_PER_STREAM,
                                   ahead_batch=lambda: self.sessions.admission.fair_batch())
        self.sessions = SessionManager(self.engine, self.scheduler, settings, self.observer)
        self.description = ModelDescription(
            model_name=model.name, precision=settings.precision, device=settings.device,
            vocabulary_size=model.tokens.size, num_parameters=model.num_parameters,
            kernels=self.engine.kernels, batching_exact=self.engine.batching_exact)

    async def start(self) -> None:
        """Check the precision against fp32 (``PrecisionError`` over the bound), warm the model
        up on the inference thread, then start batching."""
        loop = asyncio.get_running_loop()
        self.precision_error = await loop.run_in_executor(self.executor, self.engine.self_check,
                                                          self.settings.max_precision_error)
        await loop.run_in_executor(self.executor, self.engine.warmup)
        admission = self.sessions.admission
        cost = await loop.run_in_executor(self.executor, admission.calibrate, self._time_step)
        log.info("engine step %.1f ms + %.2f ms per stream (measured); load shedding admits about %s streams "
                 "(--latency-budget-ms %g)", cost.c0 * 1000, cost.c * 1000,
                 admission.capacity() if self.settings.latency_budget_ms else "any number of",
                 self.settings.latency_budget_ms)
        await self.scheduler.start()

    async def stop(self) -> None:
        await self.scheduler.stop()

    def _batch_done(self, record: BatchRecord) -> None:
        admission = self.sessions.admission
        if not record.failed:
            admission.step_done(record.size, record.seconds, record.streams or record.size)
            if self.threads is not None and admission.calibrated is not None:
                self.threads.step_done(record.seconds / admission.calibrated(record.size))
        self.observer.batch_done(record, first_step_stats(record.outputs))

    def _set_threads(self, threads: int) -> None:
        self.scheduler.call_soon_on_engine_thread(self.engine.set_threads, threads)

    def _time_step(self, batch: int, warm_steps: int = 10, timed_steps: int = 9) -> float:
        """Seconds of an engine step of ``batch`` greedy streams on silence, once their left
        context is full (the first chunks of a stream cost more), the fastest of ``timed_steps``
        (another process on the cores only ever adds time): admission control's calibration,
        run before the scheduler starts."""
        streams = [self.engine.new_stream(DecodingMethod.GREEDY, 1) for _ in range(batch)]
        window = np.zeros(WINDOW_SAMPLES, dtype=np.float32)
        times = []
        try:
            for step in range(warm_steps + timed_steps):
                start = time.perf_counter()
                self.engine.run_batch([ChunkWork(s, window) for s in streams])
                if step >= warm_steps:
                    times.append(time.perf_counter() - start)
            return float(np.min(times))
        finally:
            for stream in streams:
                self.engine.release(stream)

    def stream_config(self, *, encoding: Encoding | None, sample_rate_hertz: int, channels: int,
                      method: DecodingMethod | None, beam_width: int, max_alternatives: int,
                      interim_results: bool, word_time_offsets: bool, endpointing_disabled: bool = False,
                      trailing_silence_ms: int = 0, max_utterance_ms: int = 0,
                      request_id: str = "", speech_contexts: Sequence[SpeechContext] = ()) -> StreamConfig:
        """A ``StreamConfig`` with the server's defaults for every zero / unset field (a speech
        context's boost 0: ``--default-boost``)."""
        s = self.settings
        if method is None:
            method = DecodingMethod(s.decoding_method)
        if method is DecodingMethod.GREEDY:
            beam_width = beam_width or 1
        else:
            beam_width = beam_width or s.beam_width
        return StreamConfig(
            encoding=encoding, sample_rate_hertz=sample_rate_hertz, channels=channels or 1,
            decoding_method=method, beam_width=beam_width, max_alternatives=max_alternatives or 1,
            interim_results=interim_results, word_time_offsets=word_time_offsets,
            endpointing=Endpointing(not endpointing_disabled, trailing_silence_ms or s.endpoint_silence_ms,
                                    max_utterance_ms or s.max_utterance_ms),
            request_id=request_id,
            speech_contexts=tuple(SpeechContext(tuple(c.phrases), c.boost or s.default_boost)
                                  for c in speech_contexts if c.phrases))

    def open_session(self, api: str, client: str = "") -> Session:
        """A session for ``api`` charged to ``client`` (``server.api.status.client_of``)."""
        return self.sessions.open(api, client)

    def close_session(self, session: Session, error: BaseException | None = None) -> None:
        """Free ``session`` (call from a ``finally`` block); ``error``: what ended it, when known."""
        self.sessions.close(session, error)

    async def recognize(self, config: StreamConfig, audio: bytes, api: str,
                        client: str = "") -> tuple[list[Result], float]:
        """Unary recognition through a session: final results and the audio duration (s)."""
        session = self.open_session(api, client)
        try:
            session.start(config)
            session.feed(audio)
            session.finish_input()
            finals = [r async for r in session.results() if r.is_final]
            return finals, session.stats.audio_seconds
        finally:
            self.close_session(session)
