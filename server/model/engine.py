"""The engine: one batched model step over many streams' chunks.

``Engine.run_batch`` takes the chunks the scheduler picked (each stream at its own
position; a stream that is behind may bring several consecutive chunks) and runs,
for all of them at once: the feature front end, the streaming Emformer encoder
(``server.model.encoder``) and the decoders (``server.model.decoder``), then the endpointing
rule of each stream. It owns the weights, the precision and the per-stream model
state (left-context slots, decoder hypotheses, the current utterance). It runs
only on the scheduler's inference thread; nothing here knows about gRPC or asyncio.

Endpointing is decided here, right after each chunk is decoded, because the next
chunk of the same stream may be decoded in the same step and must then start
from a fresh decoder state (``Endpoint``).
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from server.kernels import native
from server.kernels.cpu import detect_cpu_features
from server.kernels.linear import BlockedLinear, PackedLinear, RowwiseInt8Linear
from server.kernels.precision import INT8_KERNELS, PrecisionError, apply_precision, check_precision, precision_warnings
from server.kernels.probes import relative_error
from server.model.context_graph import ContextGraph, Phrase, phrase_tokens, separator_token
from server.model.decoder import (BEAM_SEARCHES, BEAM_STEP_MAX_TOKENS, GREEDY_MAX_SYMBOLS, BeamSearchDecoder,
                                  DecoderState, DecodingNetwork, GreedyDecoder, Hypothesis, ModifiedBeamSearchDecoder,
                                  Predictor)
from server.model.encoder import SEGMENT, StreamingEncoder
from server.model.features import FeatureFrontEnd
from server.model.loading import LoadedModel
from server.types import WINDOW_FRAMES, WINDOW_SAMPLES, DecodingMethod, Endpointing, StepStats

log = logging.getLogger(__name__)

FRAME_SECONDS = 0.04  # one encoder frame: 4 feature frames of 10 ms
MAX_CHUNKS_PER_STREAM = 2  # most consecutive chunks of one stream in a step (the ring holds 8)


class Endpoint(enum.Enum):
    """What the endpointing rule decided after a chunk; the next chunk starts a new utterance."""

    FINAL = "final"  # tokens, then trailing non-speech or the longest utterance: a final result
    RESTART = "restart"  # the longest utterance passed with no token at all: start over quietly


def endpoint(rule: Endpointing | None, token_frames: tuple[int, ...], frames_done: int,
             utterance_start_frame: int) -> Endpoint | None:
    """The endpointing rule on the best hypothesis of an utterance (frames of 40 ms)."""
    if rule is None or not rule.enabled:
        return None
    utterance_ms = (frames_done - utterance_start_frame) * FRAME_SECONDS * 1000
    if token_frames:
        silence_ms = (frames_done - (token_frames[-1] + 1)) * FRAME_SECONDS * 1000
        if silence_ms >= rule.trailing_silence_ms or utterance_ms >= rule.max_utterance_ms:
            return Endpoint.FINAL
    elif utterance_ms >= rule.max_utterance_ms:
        return Endpoint.RESTART
    return None


@dataclass
class StreamState:
    """A stream's model state. Created by ``Engine.new_stream``; touched only by the engine."""

    method: DecodingMethod
    beam_width: int
    decoder: DecoderState
    endpointing: Endpointing | None = None  # None: one utterance for the whole stream
    context: ContextGraph | None = None  # the stream's phrases (contextual biasing); every utterance starts fresh
    slot: int | None = None
    chunks_done: int = 0
    utterance_start_frame: int = 0  # encoder frame where the current utterance began

    @property
    def frames_done(self) -> int:
        """Encoder frames decoded so far (40 ms each)."""
        return self.chunks_done * SEGMENT


@dataclass
class ChunkWork:
    """One stream's next window: 3200 samples at 16 kHz (segment + right context)."""

    stream: StreamState
    window: np.ndarray


@dataclass
class TokenAlternative:
    """One hypothesis in the model's tokens: ``frames[i]`` is the encoder frame (40 ms) of ``tokens[i]``."""

    tokens: tuple[int, ...]
    frames: tuple[int, ...]
    confidence: float


@dataclass
class ChunkResult:
    """The decoder's view of a stream after a chunk: best first."""

    alternatives: list[TokenAlternative]
    stability: float
    frames_done: int  # encoder frames of the stream decoded so far
    step_stats: "StepStats"
    utterance_start_frame: int = 0  # encoder frame where this chunk's utterance began
    endpoint: Endpoint | None = None  # the utterance ended with this chunk

    @property
    def best(self) -> TokenAlternative:
        return self.alternatives[0]


class Engine:
    """Batched streaming recognition over a loaded model, in one precision (``server.kernels.precision``)."""

    def __init__(self, model: LoadedModel, device: str = "cpu", precision: str = "fp32", threads: int = 0,
                 int8_kernel: str = "rowwise", max_symbols_per_frame: int = 0, beam_search: str = "torchaudio",
                 kernels: str | None = None):
        """``kernels``: the native kernel back end (``server.kernels.native.KERNELS``; ``None`` keeps the
        process's active one). ``max_symbols_per_frame``: most non-blank symbols one encoder frame may emit, in greedy
        and torchaudio's beam search; 0 takes the model's default (``LoadedModel.max_symbols_per_frame``).
        ``beam_search``: ``"torchaudio"`` (``BeamSearchDecoder``, torchaudio's algorithm) or
        ``"modified"`` (``ModifiedBeamSearchDecoder``, one symbol per frame)."""
        if beam_search not in BEAM_SEARCHES:
            raise ValueError(f"unknown beam search {beam_search!r}; choose one of {', '.join(BEAM_SEARCHES)}")
        check_precision(precision, device)
        backend = INT8_KERNELS[int8_kernel]
        self.kernels = native.select(kernels) if kernels is not None else native.active()
        self.model = model
        self.precision = precision
        self.device = torch.device(device)
        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()  # intra-op threads now (``set_threads``)
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
        self.encoder.fuse()
        self.pool = self.encoder.new_pool(self.encoder.dtype, self.device)
        self.decoding = apply_precision(DecodingNetwork(self.rnnt).to(self.device), precision, backend)
        if self.device.type == "cpu":
            log.info("kernels: %s (%s); %s", self.kernels, native.describe(self.kernels), self.products())
        self.predictor = Predictor(self.decoding, model.blank, self.device)
        cap = max_symbols_per_frame or model.max_symbols_per_frame
        self.greedy = GreedyDecoder(self.predictor, cap or GREEDY_MAX_SYMBOLS)
        self.beam_search = beam_search
        self.beam = (ModifiedBeamSearchDecoder(self.predictor) if beam_search == "modified"
                     else BeamSearchDecoder(self.predictor, cap or BEAM_STEP_MAX_TOKENS))
        with torch.inference_mode():
            self.predictor.initial()

    def products(self) -> str:
        """What runs the encoder's products and attention, in words (for the start-up log)."""
        linears = [m for m in self.encoder.layers.modules() if isinstance(m, (torch.nn.Linear, BlockedLinear,
                                                                             RowwiseInt8Linear, PackedLinear))]
        kinds = sorted({type(m).__name__ if not isinstance(m, RowwiseInt8Linear)
                        else f"RowwiseInt8Linear({m.gemm} GEMM, weights to +-{m.weight_max})" for m in linears})
        attention = ("native, ring read in place" if self.encoder.ring_attention is not None
                     and self.encoder.dtype == torch.float32 else "gather + scaled_dot_product_attention")
        layers = "one native call per step" if self.encoder.fused_layers is not None else "Python layer loop"
        return f"products {', '.join(kinds) or 'quantize_dynamic'}; attention {attention}; layers {layers}"

    def set_threads(self, threads: int) -> None:
        """Intra-op threads for the steps from now on (call on the inference thread); results do
        not depend on it (``server.core.threads``)."""
        torch.set_num_threads(threads)
        self.threads = threads

    def check_batching(self, streams: int = 3, chunks: int = 3, seed: int = 1) -> bool:
        """Whether batching is bit-exact in this engine: ``streams`` streams of seeded random
        features, at different positions (stream i starts i chunks late), batched together against
        each run alone, through the encoder and the decoding network's products (predictor and
        joiner linears, row by row). ``True`` only if every output is bitwise equal."""
        generator = torch.Generator().manual_seed(seed)
        dims = self.front_end.mean.numel()
        inputs = torch.randn(chunks + streams, streams, WINDOW_FRAMES, dims, generator=generator).to(self.device)
        exact = True
        with torch.inference_mode():
            batched_pool = self.encoder.new_pool(self.encoder.dtype, self.device)
            batched_slots = [batched_pool.allocate() for _ in range(streams)]
            solo = []
            for i in range(streams):
                pool = self.encoder.new_pool(self.encoder.dtype, self.device)
                slot = pool.allocate()
                solo.append([self.encoder(inputs[c, i:i + 1], pool, torch.tensor([slot], device=self.device),
                                          torch.tensor([c - i], device=self.device))
                             for c in range(i, i + chunks)])
            for step in range(chunks + streams - 1):
                members = [i for i in range(streams) if i <= step < i + chunks]
                out = self.encoder(inputs[step, members], batched_pool,
                                   torch.tensor([batched_slots[i] for i in members], device=self.device),
                                   torch.tensor([step - i for i in members], device=self.device))
                exact = exact and all(torch.equal(out[j:j + 1], solo[i][step - i]) for j, i in enumerate(members))
            for module in self.decoding.modules():
                if isinstance(module, (torch.nn.Linear, BlockedLinear, RowwiseInt8Linear, PackedLinear)):
                    x = torch.randn(7, module.in_features, generator=generator).to(self.device, self.encoder.dtype)
                    rows = module(x)
                    exact = exact and all(torch.equal(module(x[i:i + 1]), rows[i:i + 1]) for i in range(7))
        self.batching_exact = exact
        log.info("batching: %s (%d staggered streams batched vs alone, encoder and decoder products)",
                 "bit-exact" if exact else "NOT bit-exact: a stream's result may depend on its batch", streams)
        return exact

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

    def new_stream(self, method: DecodingMethod, beam_width: int, endpointing: Endpointing | None = None,
                   context: ContextGraph | None = None) -> StreamState:
        """``context``: the stream's phrases (``context_graph``), or ``None``."""
        return StreamState(method, beam_width, self._new_decoder_state(method, context), endpointing, context)

    def _new_decoder_state(self, method: DecodingMethod, context: ContextGraph | None = None) -> DecoderState:
        return (self.greedy if method is DecodingMethod.GREEDY else self.beam).new_state(context)

    def context_phrases(self, phrases: Sequence[tuple[str, float]]) -> list[Phrase]:
        """``(text, boost per token)`` pairs in this model's tokens: each phrase starts at a word start;
        where the word separator is a token of its own (the demo model's space), it opens the phrase
        with no bonus. Raises ``PhraseError`` naming a phrase the vocabulary cannot spell."""
        separator = separator_token(self.tokens)
        built = []
        for text, boost in phrases:
            tokens = phrase_tokens(self.tokens, text)
            bonuses = [float(boost)] * len(tokens)
            if tokens[0] == separator:
                bonuses[0] = 0.0
            built.append(Phrase(tuple(tokens), tuple(bonuses)))
        return built

    def context_graph(self, phrases: Sequence[Phrase]) -> ContextGraph | None:
        """The automaton of ``context_phrases`` for ``new_stream`` (``None`` for no phrase); pure
        Python, any thread."""
        if not phrases:
            return None
        separator = separator_token(self.tokens)
        return ContextGraph(phrases, self.tokens.size - 1, start=[separator] if separator is not None else [])

    def release(self, stream: StreamState) -> None:
        """Free the stream's left-context slot (call on the inference thread)."""
        if stream.slot is not None:
            self.pool.release(stream.slot)
            stream.slot = None

    @property
    def streams_in_pool(self) -> int:
        return self.pool.in_use

    def run_batch(self, works: list[ChunkWork]) -> list[ChunkResult]:
        """Advance every stream in ``works`` by its chunks there, in order (a stream may bring up
        to ``MAX_CHUNKS_PER_STREAM`` consecutive chunks); one result per work, in order."""
        t0 = time.perf_counter()
        stats = StepStats()
        depth, previous = self._chunk_depths(works)
        with torch.inference_mode():
            for w in works:
                if w.stream.slot is None:
                    w.stream.slot = self.pool.allocate()
            windows = torch.from_numpy(np.stack([w.window for w in works])).to(self.device)
            if windows.shape[1] != WINDOW_SAMPLES:
                raise ValueError(f"windows must have {WINDOW_SAMPLES} samples, got {windows.shape[1]}")
            features = self.front_end(windows)
            t1 = time.perf_counter()
            slots = torch.tensor([w.stream.slot for w in works], device=self.device)
            done = torch.tensor([w.stream.chunks_done + d for w, d in zip(works, depth)], device=self.device)
            encoded = self.encoder(features, self.pool, slots, done, previous)
            t2 = time.perf_counter()
            # A stream's chunks are decoded one level at a time: its second chunk after its first.
            decoded: list = [None] * len(works)
            for level in range(max(depth) + 1):
                members = [i for i, d in enumerate(depth) if d == level]
                self._decode(encoded, works, members)
                for i in members:
                    decoded[i] = self._advance(works[i].stream)
            t3 = time.perf_counter()
        stats.features, stats.encoder, stats.decoder = t1 - t0, t2 - t1, t3 - t2
        stats.total = time.perf_counter() - t0
        return [ChunkResult(alternatives, stability, frames_done, stats, utterance_start, ending)
                for alternatives, stability, frames_done, utterance_start, ending in decoded]

    def _chunk_depths(self, works: list[ChunkWork]) -> tuple[list[int], torch.Tensor | None]:
        """Each work's position among its stream's chunks in this step, and the encoder's
        ``previous`` table (None when every stream brings one chunk)."""
        depth, groups = [], {}
        for i, w in enumerate(works):
            mine = groups.setdefault(id(w.stream), [])
            depth.append(len(mine))
            mine.append(i)
        deepest = max(depth)
        if deepest >= MAX_CHUNKS_PER_STREAM:
            raise ValueError(f"a step takes at most {MAX_CHUNKS_PER_STREAM} chunks of one stream")
        if deepest == 0:
            return depth, None
        table = [[-1] * deepest for _ in works]
        for members in groups.values():
            for k, i in enumerate(members):
                table[i][:k] = members[:k]
        return depth, torch.tensor(table, device=self.device)

    def _decode(self, encoded: torch.Tensor, works: list[ChunkWork], members: list[int]) -> None:
        greedy = [i for i in members if works[i].stream.method is DecodingMethod.GREEDY]
        beam = [i for i in members if works[i].stream.method is not DecodingMethod.GREEDY]
        if greedy:
            self.greedy.step(encoded[greedy], [works[i].stream.decoder for i in greedy],
                             [works[i].stream.frames_done for i in greedy])
        if beam:
            self.beam.step(encoded[beam], [works[i].stream.decoder for i in beam],
                           [works[i].stream.frames_done for i in beam],
                           [works[i].stream.beam_width for i in beam])

    def _advance(self, stream: StreamState) -> tuple:
        """After a chunk is decoded: its result, and the endpointing rule (a new utterance, with
        a fresh decoder state, begins after an endpoint)."""
        stream.chunks_done += 1
        dec = stream.decoder
        if stream.context is not None and len(dec.hypotheses) > 1:
            dec.hypotheses = self._rank_without_unfinished(dec.hypotheses, stream.context)
        utterance_start = stream.utterance_start_frame
        ending = endpoint(stream.endpointing, dec.best.frames, stream.frames_done, utterance_start)
        snapshot = ([self._alternative(h) for h in dec.hypotheses], dec.stability(), stream.frames_done,
                    utterance_start, ending)
        if ending is not None:
            stream.decoder = self._new_decoder_state(stream.method, stream.context)
            stream.utterance_start_frame = stream.frames_done
        return snapshot

    @staticmethod
    def _rank_without_unfinished(hypotheses: list[Hypothesis], context: ContextGraph) -> list[Hypothesis]:
        """Beam hypotheses best first as if every unfinished phrase match were given back now (a
        result must not win on a phrase it has not finished), by torchaudio's length-normalised key."""
        keys = np.array([(h.score - float(context.provisional[h.context_node])) / (len(h.tokens) + 2)
                         for h in hypotheses], dtype=np.float32)
        return [hypotheses[i] for i in np.argsort(-keys, kind="stable").tolist()]

    @staticmethod
    def _alternative(h: Hypothesis) -> TokenAlternative:
        return TokenAlternative(h.tokens, h.frames, h.confidence)

    def warmup(self) -> None:
        """Run a few steps on silence so the first real stream does not pay for allocation."""
        streams = [self.new_stream(DecodingMethod.GREEDY, 1), self.new_stream(DecodingMethod.BEAM_SEARCH, 2)]
        silence = np.zeros(WINDOW_SAMPLES, dtype=np.float32)
        for _ in range(2):
            self.run_batch([ChunkWork(s, silence) for s in streams])
        self.run_batch([ChunkWork(s, silence) for s in streams for _ in range(2)])  # catching up
        for s in streams:
            self.release(s)
