"""RNN-T decoding batched across streams: greedy, and torchaudio's beam search.

Both decoders take one chunk of encoder output for B streams, ``(B, 4, E)``,
and advance each stream's own ``DecoderState``; no stream's result depends on
the others in its batch.

* ``GreedyDecoder``: the best symbol per step, up to ``max_symbols_per_frame``
  non-blank symbols per frame; every joiner and predictor call covers all streams
  still emitting on that frame.
* ``BeamSearchDecoder``: the algorithm of torchaudio's ``RNNTBeamSearch`` (same
  expansions, merging, pruning and length-normalised ranking, float32 scores),
  written as one generator per stream that *requests* joiner and predictor work;
  a driver serves the requests of all streams with one batched joiner call and
  one batched predictor call per round. Hypotheses keep their predictor output,
  so the joiner only runs on what changed.

Token 0..V-2 are symbols, V-1 the blank (torchaudio's convention).

Contextual biasing (``server.model.context_graph``): a stream with phrases has a ``ContextGraph``
in its ``DecoderState``, and each of its hypotheses the graph node it is in. Every decoder adds the
graph's bonus rows to the scores of those hypotheses' extensions (shallow fusion), for all biased
streams of a call at once (``ContextBatch``); beam search adds the running bonus to the hypothesis
score (a broken match gives its bonus back); greedy decoding adds to each symbol what it earns (no
give-back: with one hypothesis it would only hold back the tokens after a broken match), and lets a
phrase win over the blank only inside an unfinished match: elsewhere the model alone decides whether
a symbol comes, the bonus only which (else the bonus of every phrase's first token would insert
symbols at every word start).
Rows of streams without phrases are never touched: their results are exactly those without biasing.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Generator, Union

import numpy as np
import torch
import torch.nn.functional as F

from server.model.context_graph import ContextBatch, ContextGraph

PredictorState = list[list[torch.Tensor]]  # per LSTM layer: [h (N, H), c (N, H)]

GREEDY_MAX_SYMBOLS = 10  # greedy: most symbols one frame may emit, unless the model or operator says
BEAM_STEP_MAX_TOKENS = 100  # beam search: torchaudio's RNNTBeamSearch default, same meaning
BEAM_SEARCHES = ("torchaudio", "modified")  # BeamSearchDecoder, ModifiedBeamSearchDecoder


class DecodingNetwork(torch.nn.Module):
    """Copies of an RNN-T's prediction network and joiner: what the decoders run, in the
    engine's precision (the loaded model itself is left untouched)."""

    def __init__(self, rnnt: torch.nn.Module):
        super().__init__()
        self.predictor = copy.deepcopy(rnnt.predictor)
        self.joiner = copy.deepcopy(rnnt.joiner)
        self.eval()


class Predictor:
    """Batched one-token step of the RNN-T prediction network, plus the joiner.

    ``network`` holds torchaudio's ``predictor`` and ``joiner`` modules (the
    engine's own copies, in the engine's precision); activations and states
    take the dtype of the predictor's embedding.
    """

    def __init__(self, network: torch.nn.Module, blank: int, device: torch.device | str = "cpu"):
        self.network = network
        self.blank = blank
        self.device = torch.device(device)
        self.joiner_linear = network.joiner.linear
        self.joiner_activation = network.joiner.activation
        self._initial: tuple[torch.Tensor, PredictorState] | None = None
        self.fused = FusedPredictorStep.wrap(network.predictor) if self.device.type == "cpu" else None

    def step(self, tokens: torch.Tensor, state: PredictorState | None) -> tuple[torch.Tensor, PredictorState]:
        """``tokens (N,)`` -> predictor output ``(N, E)`` and the new state."""
        if self.fused is not None:
            return self.fused(tokens, state)
        out, _, new_state = self.network.predictor(input=tokens[:, None], lengths=torch.ones_like(tokens),
                                                   state=state)
        return out[:, 0], new_state

    def step_rows(self, tokens: torch.Tensor, state: PredictorState, rows: torch.Tensor) -> torch.Tensor:
        """Advance the streams ``rows (N,)`` of a batch's ``state`` (every stream's rows) by
        ``tokens (N,)``: their new states are written into ``state`` in place; returns their
        predictor output ``(N, E)``."""
        if self.fused is not None:
            return self.fused(tokens, state, rows)[0]
        out, new_state = self.step(tokens, [[t[rows] for t in layer] for layer in state])
        for layer, new_layer in zip(state, new_state):
            for old, new in zip(layer, new_layer):
                old[rows] = new.to(old.dtype)
        return out

    def initial(self) -> tuple[torch.Tensor, PredictorState]:
        """Output and state after the start symbol (the blank), from a zero state: ``(1, E)``."""
        if self._initial is None:
            self._initial = self.step(torch.tensor([self.blank], device=self.device), None)
        return self._initial

    def join(self, encoder_rows: torch.Tensor, predictor_rows: torch.Tensor) -> torch.Tensor:
        """``(N, E)`` and ``(N, E)`` -> logits ``(N, V)``, as torchaudio's ``_Joiner``."""
        return self.joiner_linear(self.joiner_activation(encoder_rows + predictor_rows))


class FusedPredictorStep:
    """torchaudio's ``_Predictor`` for one symbol per row as one native call
    (``server.kernels.native.predictor_step``): the same operators in the same order, so the same
    results as the module, without its ~220 dispatched operators and Python frames per call
    (int8 at 6 rows: 1.7 against 0.5 ms). Only for what the kernels cover: every linear a
    ``BlockedLinear`` (fp32) or every one a native ``RowwiseInt8Linear`` (int8), float32
    embedding and layer norms (``wrap`` returns ``None`` otherwise, and the module runs)."""

    def __init__(self, op, predictor: torch.nn.Module, kind: int, linears: list[torch.Tensor],
                 out_features: list[int], norms: list[torch.Tensor], eps: list[float]):
        self._op, self._kind, self._linears, self._out_features = op, kind, linears, out_features
        self._norms, self._eps = norms, eps
        self._embedding = predictor.embedding.weight.detach()
        self._hidden = [lstm.hidden_dim for lstm in predictor.lstm_layers]

    @classmethod
    def wrap(cls, predictor: torch.nn.Module) -> "FusedPredictorStep | None":
        from server.kernels import native
        from server.kernels.linear import native_layer_norm_args, native_linear_args

        op = native.predictor_step()
        layers = list(getattr(predictor, "lstm_layers", ()))
        if op is None or not layers or predictor.embedding.weight.dtype != torch.float32:
            return None
        modules = [m for lstm in layers for m in (lstm.x2g, lstm.p2g)] + [predictor.linear]
        linears = native_linear_args(modules)
        lstm_norms = [n for lstm in layers for n in (lstm.g_norm, lstm.c_norm)]
        if all(isinstance(n, torch.nn.Identity) for n in lstm_norms):  # lstm_layer_norm off
            lstm_norms = []
        norms = native_layer_norm_args([predictor.input_layer_norm, *lstm_norms, predictor.output_layer_norm])
        if linears is None or norms is None or len({*norms[1][1:-1]}) > 1:
            return None
        eps = norms[1]
        return cls(op, predictor, linears[0], linears[1], [m.out_features for m in modules], norms[0],
                   [eps[0], eps[1] if lstm_norms else 0.0, eps[-1]])

    def __call__(self, tokens: torch.Tensor, state: PredictorState | None,
                 rows: torch.Tensor | None = None) -> tuple[torch.Tensor, PredictorState]:
        """``tokens (N,)`` -> output ``(N, E)`` and new state; with ``rows``, see ``Predictor.step_rows``."""
        if state is None:
            state = [[torch.zeros(tokens.size(0), h), torch.zeros(tokens.size(0), h)] for h in self._hidden]
        flat = [t for layer in state for t in layer]
        out, new = self._op(tokens, self._embedding, self._linears, self._kind, self._out_features, self._norms,
                            self._eps, flat, rows)
        return out, [[new[2 * i], new[2 * i + 1]] for i in range(len(state))]


def stack_states(states: list[PredictorState]) -> PredictorState:
    return [[torch.cat([s[layer][i] for s in states]) for i in range(len(states[0][layer]))]
            for layer in range(len(states[0]))]


def unstack_state(state: PredictorState, index: int) -> PredictorState:
    return [[t[index:index + 1] for t in layer] for layer in state]


@dataclass
class Hypothesis:
    """One decoding path: tokens (the leading start symbol excluded), the encoder frame of
    each token, its predictor output and state after the last token, and its float32 score."""

    tokens: tuple[int, ...]
    frames: tuple[int, ...]
    predictor_out: torch.Tensor  # (1, E)
    predictor_state: PredictorState
    score: float
    token_prob_sum: float = 0.0  # sum of the emitted tokens' posteriors (for confidence)
    context_node: int = 0  # node of the stream's ContextGraph after these tokens (streams with phrases)

    @property
    def rank_key(self) -> float:
        """torchaudio's ranking: score normalised by length (start symbol counted)."""
        return self.score / (len(self.tokens) + 2)

    @property
    def confidence(self) -> float:
        return self.token_prob_sum / len(self.tokens) if self.tokens else 0.0


@dataclass
class DecoderState:
    """A stream's decoding state for the current utterance: its hypotheses, best first
    after every step. Greedy streams keep exactly one hypothesis."""

    hypotheses: list[Hypothesis] = field(default_factory=list)
    # beam search: predictor output and state by token sequence (a function of the tokens alone)
    # for the extensions of the current hypotheses computed so far: an extension proposed again
    # on a later frame (most are) costs no predictor call
    predictor_cache: dict[tuple[int, ...], tuple[torch.Tensor, PredictorState]] = field(default_factory=dict)
    context: ContextGraph | None = None  # the stream's phrases (contextual biasing), if any

    @property
    def best(self) -> Hypothesis:
        return self.hypotheses[0]

    def stability(self) -> float:
        """Share of the best hypothesis that all hypotheses agree on (1.0 for greedy)."""
        best = self.best.tokens
        if len(self.hypotheses) == 1 or not best:
            return 1.0
        common = len(best)
        for hyp in self.hypotheses[1:]:
            n = 0
            for a, b in zip(best, hyp.tokens):
                if a != b:
                    break
                n += 1
            common = min(common, n)
        return common / len(best)


def _score(hypothesis: Hypothesis) -> float:
    return hypothesis.score


def _initial_hypothesis(predictor: Predictor, context: ContextGraph | None = None) -> Hypothesis:
    out, state = predictor.initial()
    return Hypothesis((), (), out, state, 0.0, context_node=context.start if context is not None else 0)


def _new_state(predictor: Predictor, context: ContextGraph | None) -> DecoderState:
    return DecoderState([_initial_hypothesis(predictor, context)], context=context)


def _context_rows(batch: ContextBatch | None, streams: list[int], nodes: list[int], forward_only: bool = False):
    """For rows of ``streams`` (indices into the step's states) at graph ``nodes``: the rows of
    streams with phrases, their bonus rows ``(R, V-1)`` and next nodes ``(R, V-1)``; ``None`` when
    there is none."""
    if batch is None:
        return None
    rows_stream = np.asarray(streams, dtype=np.int64)
    biased = np.nonzero(batch.biased(rows_stream))[0]
    if biased.size == 0:
        return None
    node = np.asarray(nodes, dtype=np.int64)[biased]
    bonus, nxt = batch.rows(rows_stream[biased], node, forward_only)
    if forward_only:  # greedy: also whether each row is inside an unfinished match
        return biased, bonus, nxt, batch.in_match(rows_stream[biased], node)
    return biased, bonus, nxt


class GreedyDecoder:
    """Best-symbol decoding for a batch of streams."""

    def __init__(self, predictor: Predictor, max_symbols_per_frame: int = GREEDY_MAX_SYMBOLS):
        self.predictor = predictor
        self.blank = predictor.blank
        self.max_symbols_per_frame = max_symbols_per_frame
        self._context: ContextBatch | None = None  # the last step's (its joined graphs are reused)

    def new_state(self, context: ContextGraph | None = None) -> DecoderState:
        return _new_state(self.predictor, context)

    def step(self, encoder_out: torch.Tensor, states: list[DecoderState], first_frames: list[int]) -> None:
        """Decode ``encoder_out (B, T, E)``; ``first_frames[b]`` is the stream frame of row 0.

        Exactly the frame-by-frame greedy search, with fewer network calls: a stream's
        predictor output only changes when it emits, so one joiner call scores every frame
        a stream has left with its current output; each stream then takes its first
        non-blank frame (the frames before it are blanks either way), one predictor call
        advances all emitting streams, and the next round re-scores from that frame. A
        chunk costs 1 + (emission rounds) joiner calls instead of one per frame and round.
        """
        num_frames = encoder_out.size(1)
        hyps = [s.best for s in states]
        pred = torch.cat([h.predictor_out for h in hyps])
        pstate = stack_states([h.predictor_state for h in hyps])
        tokens: list[list[int]] = [list(h.tokens) for h in hyps]
        frames: list[list[int]] = [list(h.frames) for h in hyps]
        prob_sums = [h.token_prob_sum for h in hyps]
        context = self._context = ContextBatch.of([s.context for s in states], self.blank, self._context)
        nodes = [h.context_node for h in hyps]
        device = encoder_out.device
        start = [0] * len(states)  # the next frame each stream decodes
        emitted_at_start = [0] * len(states)  # symbols it already emitted on that frame
        active = list(range(len(states)))
        while active:
            spans = [(b, start[b], num_frames - start[b]) for b in active]
            stream_of_row = [b for b, _, n in spans for _ in range(n)]
            row_stream = torch.tensor(stream_of_row, device=device)
            row_frame = torch.tensor([t for _, t0, n in spans for t in range(t0, t0 + n)], device=device)
            logits = self.predictor.join(encoder_out[row_stream, row_frame], pred[row_stream])
            best_t = logits.argmax(dim=-1)
            bias = None if context is None else _context_rows(
                context, stream_of_row, [nodes[b] for b in stream_of_row], forward_only=True)
            best = best_t.tolist()
            if bias is not None:  # streams with phrases: the best symbol with what each would earn
                biased, bonus, next_nodes, in_match = bias
                scores = logits[torch.from_numpy(biased).to(device)].float().cpu().numpy()
                fused = scores[:, :self.blank] + bonus
                symbol = fused.argmax(axis=1)
                # inside an unfinished match the phrase may win over the blank; elsewhere the model
                # alone decides whether a symbol comes, the bonus only which one
                emits_symbol = np.where(in_match, fused[np.arange(len(biased)), symbol] >= scores[:, self.blank],
                                        np.asarray(best)[biased] != self.blank)
                for row_, k in zip(biased.tolist(), np.where(emits_symbol, symbol, self.blank).tolist()):
                    best[row_] = k
                next_of_row = dict(zip(biased.tolist(), next_nodes))
            emits: list[tuple[int, int, int, int]] = []  # (row, stream, frame, symbol)
            row = 0
            for b, t0, n in spans:
                for k in range(n):
                    if best[row + k] != self.blank:
                        emits.append((row + k, b, t0 + k, best[row + k]))
                        break
                row += n
            if not emits:
                break
            rows = torch.tensor([e[0] for e in emits], device=device)
            streams = torch.tensor([e[1] for e in emits], device=device)
            symbols = torch.tensor([e[3] for e in emits], device=device)
            probs = torch.softmax(logits[rows].float(), dim=-1).gather(1, symbols[:, None])[:, 0].tolist()
            pred[streams] = self.predictor.step_rows(symbols, pstate, streams).to(pred.dtype)
            active = []
            for (row_, b, t, symbol), p in zip(emits, probs):
                if bias is not None and row_ in next_of_row:
                    nodes[b] = int(next_of_row[row_][symbol])
                tokens[b].append(symbol)
                frames[b].append(first_frames[b] + t)
                prob_sums[b] += p
                emitted_at_start[b] = emitted_at_start[b] + 1 if t == start[b] else 1
                start[b] = t
                if emitted_at_start[b] == self.max_symbols_per_frame:  # the frame's cap: move on
                    start[b], emitted_at_start[b] = t + 1, 0
                if start[b] < num_frames:
                    active.append(b)
        for i, state in enumerate(states):
            state.hypotheses = [Hypothesis(tuple(tokens[i]), tuple(frames[i]), pred[i:i + 1],
                                           unstack_state(pstate, i), 0.0, prob_sums[i], nodes[i])]


@dataclass
class _JoinRequest:
    stream: int
    frame: int
    hypotheses: list[Hypothesis]


@dataclass
class _PredictRequest:
    tokens: list[int]
    hypotheses: list[Hypothesis]


_Request = Union[_JoinRequest, _PredictRequest]


class BeamSearchDecoder:
    """torchaudio's RNN-T beam search, batched across streams (see module docstring)."""

    def __init__(self, predictor: Predictor, step_max_tokens: int = BEAM_STEP_MAX_TOKENS):
        self.predictor = predictor
        self.blank = predictor.blank
        self.step_max_tokens = step_max_tokens
        self._context: ContextBatch | None = None  # this step's streams' phrases

    def new_state(self, context: ContextGraph | None = None) -> DecoderState:
        return _new_state(self.predictor, context)

    def step(self, encoder_out: torch.Tensor, states: list[DecoderState], first_frames: list[int],
             beam_widths: list[int]) -> None:
        """Run every stream's search over ``encoder_out (B, T, E)``, in rounds: one predictor call for
        every pending predictor request, then one joiner call for every join request whose rows are
        not known yet.

        A hypothesis's joiner output on a frame depends on its tokens alone (through its predictor
        output), so each stream keeps the log-probabilities it has by (frame, tokens) for the step,
        and every joiner call also scores the hypotheses it joins on frame t on frame t + 1: the
        next frame's beam is drawn from them, so its first join needs no call of its own, and a
        frame with an emission costs one predictor and one joiner call (not two joiner calls)."""
        self._context = ContextBatch.of([s.context for s in states], self.blank, self._context)
        num_frames = encoder_out.size(1)
        searches = {i: self._search(i, states[i].hypotheses, beam_widths[i], num_frames, first_frames[i],
                                    states[i].predictor_cache)
                    for i in range(len(states))}
        biased = (set() if self._context is None
                  else set(np.nonzero(self._context.biased(np.arange(len(states))))[0].tolist()))
        known: list[dict[tuple[int, tuple[int, ...]], np.ndarray]] = [{} for _ in states]  # logp rows
        ahead: list[list[tuple[int, Hypothesis]]] = [[] for _ in states]  # rows for the next joiner call
        requests: dict[int, _Request] = {i: next(search) for i, search in searches.items()}

        def send(i: int, reply) -> None:
            try:
                requests[i] = searches[i].send(reply)
            except StopIteration as done:
                states[i].hypotheses = done.value
                del requests[i]
                alive = {h.tokens for h in done.value}
                cache = states[i].predictor_cache
                for key in [k for k in cache if k[:-1] not in alive]:
                    del cache[key]

        while requests:
            predicts = [(i, r) for i, r in requests.items() if isinstance(r, _PredictRequest)]
            if predicts:
                for i, reply in self._predict(predicts):
                    send(i, reply)
            self._join(encoder_out, requests, known, ahead)
            for i in list(requests):  # every join whose rows are known, and the ones that follow
                while isinstance(requests.get(i), _JoinRequest):
                    r = requests[i]
                    rows = [known[i].get((r.frame, h.tokens)) for h in r.hypotheses]
                    if any(row is None for row in rows):
                        break
                    if r.frame + 1 < num_frames:
                        ahead[i].extend((r.frame + 1, h) for h in r.hypotheses
                                        if (r.frame + 1, h.tokens) not in known[i])
                    send(i, (np.stack(rows), self._context_of(i, r.hypotheses) if i in biased else None))

    def _context_of(self, stream: int, hypotheses: list[Hypothesis]):
        """The bonus rows and next graph nodes of a biased stream's ``hypotheses`` (one gather)."""
        bias = _context_rows(self._context, [stream] * len(hypotheses), [h.context_node for h in hypotheses])
        return None if bias is None else (bias[1], bias[2])

    def _join(self, encoder_out: torch.Tensor, requests: dict[int, _Request], known: list[dict],
              ahead: list[list[tuple[int, Hypothesis]]]) -> None:
        """One joiner call for the rows of the join requests not in ``known``, when there are any,
        with the same hypotheses on the next frame and the rows waiting in ``ahead``; the
        log-probabilities go into ``known``."""
        num_frames = encoder_out.size(1)
        rows: list[tuple[int, int, Hypothesis]] = []
        wanted: set = set()

        def want(i: int, t: int, h: Hypothesis) -> None:
            if (t, h.tokens) not in known[i] and (i, t, h.tokens) not in wanted:
                wanted.add((i, t, h.tokens))
                rows.append((i, t, h))

        joins = [(i, r) for i, r in requests.items() if isinstance(r, _JoinRequest)]
        for i, r in joins:
            for h in r.hypotheses:
                want(i, r.frame, h)
        if not rows:
            return
        for i, r in joins:
            if r.frame + 1 < num_frames:
                for h in r.hypotheses:
                    want(i, r.frame + 1, h)
        for i, pending in enumerate(ahead):
            for t, h in pending:
                want(i, t, h)
            pending.clear()
        device = encoder_out.device
        enc = encoder_out[torch.tensor([i for i, _, _ in rows], device=device),
                          torch.tensor([t for _, t, _ in rows], device=device)]
        pred = torch.cat([h.predictor_out for _, _, h in rows])
        # numpy from here: the search's many small float32 sums, sorts and top-k cost a
        # fraction of torch's per-call overhead, with the same float32 roundings
        logp = F.log_softmax(self.predictor.join(enc, pred).float(), dim=-1).cpu().numpy()
        for k, (i, t, h) in enumerate(rows):
            known[i][(t, h.tokens)] = logp[k]

    def _predict(self, predicts: list[tuple[int, _PredictRequest]]) -> list[tuple[int, list]]:
        """Answer every predictor request with one predictor call."""
        device = self.predictor.device
        tokens = torch.tensor([t for _, r in predicts for t in r.tokens], device=device)
        state = stack_states([h.predictor_state for _, r in predicts for h in r.hypotheses])
        out, new_state = self.predictor.step(tokens, state)
        replies, start = [], 0
        for i, r in predicts:
            n = len(r.tokens)
            replies.append((i, [(out[k:k + 1], unstack_state(new_state, k)) for k in range(start, start + n)]))
            start += n
        return replies

    def _search(self, stream: int, hyps: list[Hypothesis], beam: int, num_frames: int,
                first_frame: int, cache: dict) -> Generator[_Request, object, list[Hypothesis]]:
        """One stream's beam search over ``num_frames`` frames (torchaudio's ``_search``);
        ``cache`` is the stream's ``DecoderState.predictor_cache``."""
        for t in range(num_frames):
            expanding = hyps  # hypotheses that may still emit on this frame
            ended: list[Hypothesis] = []  # hypotheses that closed the frame with a blank, ascending
            ended_by_tokens: dict[tuple[int, ...], Hypothesis] = {}
            emitted = 0
            while expanding:
                logp, context = yield _JoinRequest(stream, t, expanding)
                ended = self._close_with_blank(ended, expanding, logp, ended_by_tokens)
                if emitted == self.step_max_tokens:
                    break
                expanding = yield from self._expand(expanding, ended, logp, beam, first_frame + t, cache, context)
                if expanding:
                    emitted += 1
            keys = np.array([h.rank_key for h in ended], dtype=np.float32)  # float32 keys, as torchaudio's
            hyps = [ended[i] for i in np.argsort(-keys, kind="stable")[:beam].tolist()]
        return hyps

    @staticmethod
    def _close_with_blank(ended: list[Hypothesis], expanding: list[Hypothesis], logp: np.ndarray,
                          ended_by_tokens: dict) -> list[Hypothesis]:
        """Add each expanding hypothesis + blank to ``ended``, merging equal token sequences.
        ``logp``: (len(expanding), V) float32 log-probabilities."""
        # float32 sums, as torchaudio's (one vector add for all hypotheses: the same roundings)
        blank_scores = (np.array([h.score for h in expanding], dtype=np.float32) + logp[:, -1]).tolist()
        for hyp, blank in zip(expanding, blank_scores):
            previous = ended_by_tokens.get(hyp.tokens)
            if previous is not None:
                for j, other in enumerate(ended):
                    if other is previous:
                        del ended[j]
                        break
                # float32 logaddexp, as torchaudio's merge (numpy's gives torch's bits, at a tenth the cost)
                score = float(np.logaddexp(np.float32(previous.score), np.float32(blank)))
            else:
                score = blank
            closed = Hypothesis(hyp.tokens, hyp.frames, hyp.predictor_out, hyp.predictor_state,
                                score, hyp.token_prob_sum, hyp.context_node)
            ended.append(closed)
            ended_by_tokens[hyp.tokens] = closed
        ended.sort(key=_score)  # stable, ascending; the scores are float32 values, compared exactly
        return ended

    def _expand(self, expanding: list[Hypothesis], ended: list[Hypothesis], logp: np.ndarray, beam: int,
                frame: int, cache: dict, context=None) -> Generator[_Request, object, list[Hypothesis]]:
        """The best ``beam`` one-symbol extensions that beat the ``beam``-th ended hypothesis; the
        predictor runs only on those not in ``cache`` (token sequence -> output, state).
        ``context``: for a stream with phrases, the bonus rows and next graph nodes of ``expanding``."""
        scores = np.array([h.score for h in expanding], dtype=np.float32)[:, None] + logp[:, :-1]
        if context is not None:
            scores += context[0]  # float32: the running bonus of each extension
        scores = scores.reshape(-1)
        threshold = ended[-beam].score if len(ended) >= beam else -math.inf
        if float(scores.max()) <= threshold:  # no extension beats the beam-th ended hypothesis (often)
            return []
        top = np.argpartition(scores, scores.size - beam)[-beam:]  # the best beam, unordered (V may be 4 097)
        symbols = logp.shape[1] - 1
        rows, tokens, new_scores = [], [], []
        # best first; on a tie, the lower index
        for negative, index in sorted(zip((-scores[top]).tolist(), top.tolist())):
            score = -negative
            if score > threshold:
                rows.append(index // symbols)
                tokens.append(index % symbols)
                new_scores.append(score)
        if not rows:
            return []
        base = [expanding[r] for r in rows]
        chosen = logp[rows, tokens].tolist()  # the new symbols' log-probabilities, one gather
        keys = [h.tokens + (tok,) for h, tok in zip(base, tokens)]
        outputs = [cache.get(key) for key in keys]  # (predictor output, state) or None
        missing = [k for k, output in enumerate(outputs) if output is None]
        if missing:
            computed = yield _PredictRequest([tokens[k] for k in missing], [base[k] for k in missing])
            for k, output in zip(missing, computed):
                outputs[k] = cache[keys[k]] = output
        nodes = context[1][rows, tokens].tolist() if context is not None else [0] * len(rows)
        return [Hypothesis(key, h.frames + (frame,), out, state, score, h.token_prob_sum + math.exp(lp), node)
                for lp, h, key, score, (out, state), node in zip(chosen, base, keys, new_scores, outputs, nodes)]


class ModifiedBeamSearchDecoder:
    """Modified beam search (k2 / icefall's ``modified_beam_search``), batched across streams
    and hypotheses: at most one symbol per frame, so a chunk costs exactly one joiner call and
    one predictor call per frame, for all streams at once.

    On every frame each hypothesis is scored once; each stream keeps the ``beam`` best of its
    hypotheses x (blank + every symbol), by accumulated log-probability (float32). Candidates
    that end with the same symbols merge (their probabilities add); the new symbols of the
    survivors go through one batched predictor call. Hypotheses are returned best first by
    length-normalised score, as torchaudio ranks them.
    """

    def __init__(self, predictor: Predictor):
        self.predictor = predictor
        self.blank = predictor.blank
        self._context: ContextBatch | None = None  # this step's streams' phrases

    def new_state(self, context: ContextGraph | None = None) -> DecoderState:
        return _new_state(self.predictor, context)

    def step(self, encoder_out: torch.Tensor, states: list[DecoderState], first_frames: list[int],
             beam_widths: list[int]) -> None:
        """Decode ``encoder_out (B, T, E)`` into ``states``; ``first_frames[b]``: stream frame of row 0."""
        self._context = ContextBatch.of([s.context for s in states], self.blank, self._context)
        hyps = [s.hypotheses for s in states]
        for t in range(encoder_out.size(1)):
            hyps = self._frame(encoder_out[:, t], hyps, [f + t for f in first_frames], beam_widths)
        for state, mine in zip(states, hyps):
            state.hypotheses = sorted(mine, key=lambda h: h.rank_key, reverse=True)

    def _frame(self, encoder_rows: torch.Tensor, hyps: list[list[Hypothesis]], frames: list[int],
               beams: list[int]) -> list[list[Hypothesis]]:
        flat = [h for mine in hyps for h in mine]
        owner = torch.tensor([b for b, mine in enumerate(hyps) for _ in mine], device=encoder_rows.device)
        logp = F.log_softmax(self.predictor.join(encoder_rows[owner], torch.cat([h.predictor_out for h in flat]))
                             .float(), dim=-1)
        scores = logp + torch.tensor([h.score for h in flat], device=logp.device)[:, None]
        bias = None if self._context is None else _context_rows(
            self._context, [b for b, mine in enumerate(hyps) for _ in mine], [h.context_node for h in flat])
        next_of_row = {}
        if bias is not None:  # streams with phrases: each extension's running bonus
            biased, bonus, next_nodes = bias
            rows_b = torch.from_numpy(biased).to(logp.device)
            scores[rows_b, :self.blank] += torch.from_numpy(bonus).to(logp.device)
            next_of_row = dict(zip(biased.tolist(), next_nodes))
        vocab = logp.size(1)
        # every stream's candidates in one row (padded with -inf), one top-k for all streams
        most = max(len(mine) for mine in hyps)
        table = scores.new_full((len(hyps), most * vocab), -math.inf)
        start = 0
        for b, mine in enumerate(hyps):
            table[b, :len(mine) * vocab] = scores[start:start + len(mine)].reshape(-1)
            start += len(mine)
        k = min(max(beams), most * vocab)
        best_scores, best_index = table.topk(k, dim=1)
        best_scores, best_index = best_scores.tolist(), best_index.tolist()
        chosen_logp = logp.cpu()
        survivors: list[dict[tuple[int, ...], Hypothesis]] = []
        extend: list[tuple[int, tuple[int, ...], int, Hypothesis, float]] = []  # new symbols to predict
        offset = 0
        for b, mine in enumerate(hyps):
            kept: dict[tuple[int, ...], Hypothesis] = {}
            for score, index in zip(best_scores[b][:beams[b]], best_index[b][:beams[b]]):
                if score == -math.inf:
                    break
                parent, symbol = mine[index // vocab], index % vocab
                node = parent.context_node
                if symbol == self.blank:
                    key, frames_, prob = parent.tokens, parent.frames, parent.token_prob_sum
                else:
                    if offset + index // vocab in next_of_row:
                        node = int(next_of_row[offset + index // vocab][symbol])
                    key = parent.tokens + (symbol,)
                    frames_ = parent.frames + (frames[b],)
                    prob = parent.token_prob_sum + math.exp(float(chosen_logp[offset + index // vocab, symbol]))
                previous = kept.get(key)
                if previous is not None:  # the same symbols by another path: probabilities add
                    previous.score = float(torch.tensor(previous.score).logaddexp(torch.tensor(score)))
                    continue
                kept[key] = Hypothesis(key, frames_, parent.predictor_out, parent.predictor_state, score, prob,
                                       node)
                if symbol != self.blank:
                    extend.append((b, key, symbol, parent, score))
            survivors.append(kept)
            offset += len(mine)
        if extend:
            tokens = torch.tensor([symbol for _, _, symbol, _, _ in extend], device=encoder_rows.device)
            out, new_state = self.predictor.step(tokens, stack_states([p.predictor_state for *_, p, _ in extend]))
            for k_, (b, key, _, _, _) in enumerate(extend):
                hyp = survivors[b][key]
                hyp.predictor_out, hyp.predictor_state = out[k_:k_ + 1], unstack_state(new_state, k_)
        return [list(kept.values()) for kept in survivors]
