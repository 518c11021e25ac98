"""The engine: one batched model step over many streams' chunks.

``Engine.run_batch`` takes the chunks the scheduler picked (one per stream, each
stream at its own position) and runs, for all of them at once: the feature
front end, the streaming Emformer encoder (``server.encoder``) and the decoders
(``server.decoder``). It owns the weights, the precision and the per-stream
model state (left-context slots, decoder hypotheses). It runs only on the
scheduler's inference thread; nothing here knows about gRPC or asyncio.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from server.config import DecodingMethod
from server.decoder import (BEAM_STEP_MAX_TOKENS, GREEDY_MAX_SYMBOLS, BeamSearchDecoder, DecoderState,
                            DecodingNetwork, GreedyDecoder, Hypothesis, Predictor)
from server.encoder import SEGMENT, StreamingEncoder
from server.features import WINDOW_FRAMES, WINDOW_SAMPLES, FeatureFrontEnd
from server.models import LoadedModel
from server.precision import (INT8_KERNELS, PrecisionError, apply_precision, check_precision,
                              detect_cpu_features, precision_warnings, relative_error)

log = logging.getLogger(__name__)

FRAME_SECONDS = 0.04  # one encoder frame: 4 feature frames of 10 ms


@dataclass
class StreamState:
    """A stream's model state. Created by ``Engine.new_stream``; touched only by the engine."""

    method: DecodingMethod
    beam_width: int
    decoder: DecoderState
    slot: int | None = None
    chunks_done: int = 0

    @property
    def frames_done(self) -> int:
        """Encoder frames decoded so far (40 ms each)."""
        return self.chunks_done * SEGMENT


@dataclass
class ChunkWork:
    """One stream's next window: 3200 samples at 16 kHz (segment + right context)."""

    stream: StreamState
    window: np.ndarray
    reset_decoder: bool = False  # start a new utterance before decoding this chunk


@dataclass
class Alternative:
    tokens: tuple[int, ...]
    frames: tuple[int, ...]
    confidence: float


@dataclass
class ChunkResult:
    """The decoder's view of a stream after a chunk: best first."""

    alternatives: list[Alternative]
    stability: float
    frames_done: int  # encoder frames of the stream decoded so far
    batch_size: int
    compute_seconds: float
    step_stats: "StepStats"

    @property
    def best(self) -> Alternative:
        return self.alternatives[0]


@dataclass
class StepStats:
    """Timing of one batched step, for metrics (seconds)."""

    batch_size: int = 0
    features: float = 0.0
    encoder: float = 0.0
    decoder: float = 0.0
    total: float = 0.0
    greedy_streams: int = 0
    beam_streams: int = 0
    extra: dict = field(default_factory=dict)


class Engine:
    """Batched streaming recognition over a loaded model, in one precision (``server.precision``)."""

    def __init__(self, model: LoadedModel, device: str = "cpu", precision: str = "fp32", threads: int = 0,
                 int8_kernel: str = "rowwise", max_symbols_per_frame: int = 0):
        """``max_symbols_per_frame``: most non-blank symbols one encoder frame may emit, in greedy
        and beam search; 0 takes the model's default (``LoadedModel.max_symbols_per_frame``)."""
        check_precision(precision, device)
        backend = INT8_KERNELS[int8_kernel]
        self.model = model
        self.precision = precision
        self.device = torch.device(device)
        if threads:
            torch.set_num_threads(threads)
        if device == "cpu":
            features = detect_cpu_features()
            log.info("CPU matrix features: %s; torch %s kernels, %d threads", features.describe(),
                     torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())
            for warning in precision_warnings(precision, device, features):
                log.warning("--precision %s: %s", precision, warning)
        self.rnnt = model.rnnt.to(self.device).eval()
        self.front_end = FeatureFrontEnd(model.stats).to(self.device)
        # The engine runs its own copies of the networks, converted once to the precision;
        # the loaded model stays fp32 (the self-check compares against it).
        self.encoder = apply_precision(StreamingEncoder(self.rnnt.transcriber).to(self.device), precision, backend)
        self.pool = self.encoder.new_pool(self.encoder.dtype, self.device)
        self.decoding = apply_precision(DecodingNetwork(self.rnnt).to(self.device), precision, backend)
        self.predictor = Predictor(self.decoding, model.blank, self.device)
        cap = max_symbols_per_frame or model.max_symbols_per_frame
        self.greedy = GreedyDecoder(self.predictor, cap or GREEDY_MAX_SYMBOLS)
        self.beam = BeamSearchDecoder(self.predictor, cap or BEAM_STEP_MAX_TOKENS)
        with torch.inference_mode():
            self.predictor.initial()

    def self_check(self, max_error: float, chunks: int = 12, streams: int = 2, seed: int = 0) -> float:
        """Relative error of this precision's encoder output against fp32 on a fixed input.

        Runs ``chunks`` chunks (past the left-context warm-up) of seeded random
        normalised features for ``streams`` streams through this engine's encoder and
        through an fp32 copy built from the loaded model; returns
        ``||out - out_fp32|| / ||out_fp32||`` and raises ``PrecisionError`` above ``max_error``.
        """
        if self.precision == "fp32":
            return 0.0
        generator = torch.Generator().manual_seed(seed)
        inputs = torch.randn(chunks, streams, WINDOW_FRAMES, self.front_end.mean.numel(), generator=generator)
        reference = StreamingEncoder(self.rnnt.transcriber).to(self.device)
        outputs = []
        with torch.inference_mode():
            for encoder in (reference, self.encoder):
                pool = encoder.new_pool(encoder.dtype, self.device)
                slots = torch.tensor([pool.allocate() for _ in range(streams)], device=self.device)
                outputs.append(torch.cat([
                    encoder(inputs[i].to(self.device), pool, slots,
                            torch.full((streams,), i, device=self.device)).float()
                    for i in range(chunks)], dim=1))
        error = relative_error(outputs[0], outputs[1])
        log.info("precision self-check: %s encoder output vs fp32, relative error %.2e (bound %.2e)",
                 self.precision, error, max_error)
        if error > max_error:
            raise PrecisionError(
                f"--precision {self.precision} changes this model's encoder output by a relative error of "
                f"{error:.3g}, over the bound {max_error:g} (--max-precision-error); use a wider precision "
                f"or raise the bound if you accept the accuracy loss")
        return error

    @property
    def tokens(self):
        return self.model.tokens

    def new_stream(self, method: DecodingMethod, beam_width: int) -> StreamState:
        return StreamState(method, beam_width, self._new_decoder_state(method))

    def _new_decoder_state(self, method: DecodingMethod) -> DecoderState:
        return (self.greedy if method is DecodingMethod.GREEDY else self.beam).new_state()

    def release(self, stream: StreamState) -> None:
        """Free the stream's left-context slot (call on the inference thread)."""
        if stream.slot is not None:
            self.pool.release(stream.slot)
            stream.slot = None

    @property
    def streams_in_pool(self) -> int:
        return self.pool.in_use

    def run_batch(self, works: list[ChunkWork]) -> list[ChunkResult]:
        """Advance every stream in ``works`` by one chunk (each stream at most once)."""
        t0 = time.perf_counter()
        stats = StepStats(batch_size=len(works))
        with torch.inference_mode():
            for w in works:
                if w.stream.slot is None:
                    w.stream.slot = self.pool.allocate()
                if w.reset_decoder:
                    w.stream.decoder = self._new_decoder_state(w.stream.method)
            windows = torch.from_numpy(np.stack([w.window for w in works])).to(self.device)
            if windows.shape[1] != WINDOW_SAMPLES:
                raise ValueError(f"windows must have {WINDOW_SAMPLES} samples, got {windows.shape[1]}")
            features = self.front_end(windows)
            t1 = time.perf_counter()
            slots = torch.tensor([w.stream.slot for w in works], device=self.device)
            done = torch.tensor([w.stream.chunks_done for w in works], device=self.device)
            encoded = self.encoder(features, self.pool, slots, done)
            t2 = time.perf_counter()
            greedy = [i for i, w in enumerate(works) if w.stream.method is DecodingMethod.GREEDY]
            beam = [i for i, w in enumerate(works) if w.stream.method is not DecodingMethod.GREEDY]
            if greedy:
                self.greedy.step(encoded[greedy], [works[i].stream.decoder for i in greedy],
                                 [works[i].stream.frames_done for i in greedy])
            if beam:
                self.beam.step(encoded[beam], [works[i].stream.decoder for i in beam],
                               [works[i].stream.frames_done for i in beam],
                               [works[i].stream.beam_width for i in beam])
            t3 = time.perf_counter()
        for w in works:
            w.stream.chunks_done += 1
        stats.features, stats.encoder, stats.decoder = t1 - t0, t2 - t1, t3 - t2
        stats.total = time.perf_counter() - t0
        stats.greedy_streams, stats.beam_streams = len(greedy), len(beam)
        return [self._result(w.stream, stats) for w in works]

    @staticmethod
    def _alternative(h: Hypothesis) -> Alternative:
        return Alternative(h.tokens, h.frames, h.confidence)

    def _result(self, stream: StreamState, stats: StepStats) -> ChunkResult:
        dec = stream.decoder
        return ChunkResult([self._alternative(h) for h in dec.hypotheses], dec.stability(),
                           stream.frames_done, stats.batch_size, stats.total, stats)

    def warmup(self) -> None:
        """Run a few steps on silence so the first real stream does not pay for allocation."""
        streams = [self.new_stream(DecodingMethod.GREEDY, 1), self.new_stream(DecodingMethod.BEAM_SEARCH, 2)]
        silence = np.zeros(WINDOW_SAMPLES, dtype=np.float32)
        for _ in range(2):
            self.run_batch([ChunkWork(s, silence) for s in streams])
        for s in streams:
            self.release(s)
