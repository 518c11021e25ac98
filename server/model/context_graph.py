"""Contextual biasing: a stream's phrases as an Aho-Corasick automaton over the model's tokens,
for shallow fusion in the decoders.

A phrase is a token sequence with a bonus per token (its ``boost``). A hypothesis carries one node
of its stream's graph: the longest suffix of its tokens (since the utterance began) that is a
prefix of some phrase. Emitting a token moves it to the next node and changes its running bonus:

* following a phrase (a trie edge) earns the edge's bonus;
* a match that breaks off gives back the bonus of its unfinished part (the *provisional* bonus),
  and whatever the new node's suffix has matched is earned at once;
* a completed phrase's bonus is kept for good (its *locked* part).

So a hypothesis's running bonus is always ``locked (all completed matches) + provisional[node]``.
Blank never changes the node or the bonus.

The automaton is stored for batched lookups: every node's transitions equal the root's
(``next_root``, bonus ``base - provisional[node]``) except for the tokens of its exceptions (the
children of the node and of the nodes on its failure chain), kept in one CSR table.
``ContextBatch`` joins the graphs of the streams in one decoder step, so that the bonus rows of
all hypotheses of all streams come from a few numpy gathers, with no loop over streams or tokens.

Which tokens a phrase is, is the vocabulary's business (``phrase_tokens``): a phrase starts at a
word start. For a vocabulary whose word separator is a token of its own (the demo model's space),
the separator opens every phrase with no bonus, and a new utterance starts in the node after it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np

WORD_MARK = "\u2581"  # SentencePiece's word-start marker (the vocabulary's spelling of a word start)


class PhraseError(ValueError):
    """A phrase the vocabulary cannot spell."""


def phrase_tokens(vocabulary, text: str) -> list[int]:
    """``text``'s tokens in ``vocabulary`` (a ``TokenTable``), starting at a word start.

    A SentencePiece vocabulary encodes it with its own model; any other is matched longest piece
    first against its pieces (the demo model: one character per token). Raises ``PhraseError``
    for an empty phrase or one with characters the vocabulary has no token for."""
    words = text.split()
    if not words:
        raise PhraseError("a phrase must have a word")
    sp = getattr(vocabulary, "sp", None)
    if sp is not None:
        tokens = [t for t in sp.encode(" ".join(words)) if vocabulary.piece(t)]
        if len(tokens) == 0 or any(t == sp.unk_id() for t in sp.encode(" ".join(words))):
            raise PhraseError(f"phrase {text!r} has characters the model has no token for")
        return tokens
    pieces = _pieces(vocabulary)
    if not any(p != p.upper() for p in pieces) and any(p != p.lower() for p in pieces):
        words = [w.upper() for w in words]
    elif not any(p != p.lower() for p in pieces):
        words = [w.lower() for w in words]
    spelled = WORD_MARK + WORD_MARK.join(words)
    longest = max(len(p) for p in pieces)
    tokens, i = [], 0
    while i < len(spelled):
        for n in range(min(longest, len(spelled) - i), 0, -1):
            token = pieces.get(spelled[i:i + n])
            if token is not None:
                tokens.append(token)
                i += n
                break
        else:
            raise PhraseError(f"phrase {text!r} has a character the model has no token for: {spelled[i]!r}")
    return tokens


_PIECES: dict[int, tuple[object, dict[str, int]]] = {}  # id(vocabulary) -> (vocabulary, piece -> token)


def _pieces(vocabulary) -> dict[str, int]:
    known = _PIECES.get(id(vocabulary))
    if known is None or known[0] is not vocabulary:
        pieces: dict[str, int] = {}
        for token in range(vocabulary.size - 1):
            piece = vocabulary.piece(token)
            if piece and piece not in pieces:
                pieces[piece] = token
        known = _PIECES[id(vocabulary)] = (vocabulary, pieces)
    return known[1]


def separator_token(vocabulary) -> int | None:
    """The vocabulary's word separator when it is a token of its own (the demo model's space)."""
    for token in range(vocabulary.size - 1):
        if vocabulary.piece(token) == WORD_MARK:
            return token
    return None


@dataclass(frozen=True)
class Phrase:
    tokens: tuple[int, ...]
    bonuses: tuple[float, ...]  # one per token


class ContextGraph:
    """The automaton of one stream's phrases (immutable; shared by all its hypotheses).

    ``symbols``: the number of non-blank tokens (token ids ``0 .. symbols - 1``).
    ``start``: tokens fed from the root to give the node a new utterance starts in.
    """

    def __init__(self, phrases: Sequence[Phrase], symbols: int, start: Sequence[int] = ()):
        if not phrases:
            raise ValueError("a context graph needs a phrase")
        self.symbols = symbols
        children: list[dict[int, int]] = [{}]
        edge_bonus: list[float] = [0.0]  # bonus of the edge into each node (the most any phrase gives)
        is_end = [False]
        for phrase in phrases:
            if len(phrase.tokens) != len(phrase.bonuses) or not phrase.tokens:
                raise ValueError("a phrase needs one bonus per token, and a token")
            node = 0
            for token, bonus in zip(phrase.tokens, phrase.bonuses):
                if not 0 <= token < symbols:
                    raise ValueError(f"token {token} is not a symbol (0 .. {symbols - 1})")
                child = children[node].get(token)
                if child is None:
                    child = len(children)
                    children[node][token] = child
                    children.append({})
                    edge_bonus.append(bonus)
                    is_end.append(False)
                else:
                    edge_bonus[child] = max(edge_bonus[child], bonus)
                node = child
            is_end[node] = True
        n = len(children)
        score = [0.0] * n  # bonus along the trie path from the root
        locked = [0.0] * n  # score of the deepest completed phrase on that path
        fail = [0] * n
        order = []  # breadth first, root excluded
        queue = deque((child, 0, token) for token, child in children[0].items())
        while queue:
            node, parent, token = queue.popleft()
            order.append(node)
            score[node] = score[parent] + edge_bonus[node]
            locked[node] = score[node] if is_end[node] else locked[parent]
            if parent:
                f = fail[parent]
                while f and token not in children[f]:
                    f = fail[f]
                fail[node] = children[f].get(token, 0)
            queue.extend((c, node, t) for t, c in children[node].items())
        provisional = [s - lk for s, lk in zip(score, locked)]
        # transitions: the root's, plus per node the tokens where it differs (children of the node
        # and of its failure chain); a node's exceptions extend those of its failure target
        next_root = np.zeros(symbols, dtype=np.int64)
        base = np.zeros(symbols, dtype=np.float64)
        for token, child in children[0].items():
            next_root[token] = child
            base[token] = score[child]
        targets: list[dict[int, int]] = [{} for _ in range(n)]  # token -> next node, per node
        for node in order:
            table = dict(targets[fail[node]])  # breaking off via the failure link
            table.update(children[node])  # following the phrase
            targets[node] = table
        ex_token, ex_next, ex_delta = [], [], []
        counts = [0] * n
        for node in range(n):
            table = targets[node]
            counts[node] = len(table)
            own = children[node]
            give_back = provisional[node]
            for token in sorted(table):
                target = table[token]
                ex_token.append(token)
                ex_next.append(target)
                ex_delta.append(score[target] - score[node] if own.get(token) == target
                                else score[target] - give_back)
        self.ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.ex_token = np.array(ex_token, dtype=np.int32)
        self.ex_next = np.array(ex_next, dtype=np.int32)
        self.ex_delta = np.array(ex_delta, dtype=np.float32)
        score, locked, provisional = (np.array(x, dtype=np.float64) for x in (score, locked, provisional))
        self.next_root = next_root
        self.base = base.astype(np.float32)
        self.provisional = provisional.astype(np.float32)
        self.locked = locked.astype(np.float32)
        self.score = score.astype(np.float32)
        self.fail = np.array(fail, dtype=np.int64)
        self.num_nodes = n
        self.num_phrases = len(phrases)
        node = 0
        for token in start:
            node = self.step(node, token)[0]
        self.start = node

    def step(self, node: int, token: int) -> tuple[int, float]:
        """One token from ``node``: the next node and the change of the running bonus."""
        lo, hi = self.ptr[node], self.ptr[node + 1]
        hit = np.nonzero(self.ex_token[lo:hi] == token)[0]
        if hit.size:
            k = lo + hit[0]
            return int(self.ex_next[k]), float(self.ex_delta[k])
        return int(self.next_root[token]), float(self.base[token] - self.provisional[node])

    def walk(self, tokens: Sequence[int], node: int | None = None) -> tuple[int, float]:
        """The node after ``tokens`` (from ``node``, default ``start``) and the bonus earned on the way."""
        node = self.start if node is None else node
        total = 0.0
        for token in tokens:
            node, delta = self.step(node, token)
            total += delta
        return node, total


class ContextBatch:
    """The graphs of one decoder step's streams joined into flat arrays: the bonus rows and the
    next nodes of any set of (graph, node) pairs by a few numpy gathers.

    ``graphs``: one per stream of the step, ``None`` for a stream without phrases; a row names
    its stream by its index here (``rows_stream``) and its node by the graph's own node ids."""

    def __init__(self, graphs: Sequence[ContextGraph | None], symbols: int, previous: "ContextBatch | None" = None):
        self.symbols = symbols
        ordered = sorted({id(g): g for g in graphs if g is not None}.values(), key=id)
        index = {id(g): k for k, g in enumerate(ordered)}
        self.graph_of = np.array([index[id(g)] if g is not None else -1 for g in graphs], dtype=np.int64)
        self.graphs = ordered  # held: their ids stay theirs while this batch may be reused
        if previous is not None and len(previous.graphs) == len(ordered) and all(
                a is b for a, b in zip(previous.graphs, ordered)):  # the same streams' graphs: no copy
            for name in ("node_offset", "base", "next_root", "provisional", "ptr", "ex_token", "ex_next",
                         "ex_delta"):
                setattr(self, name, getattr(previous, name))
            return
        sizes = np.array([g.num_nodes for g in ordered], dtype=np.int64)
        self.node_offset = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        ex_sizes = np.array([g.ex_token.size for g in ordered], dtype=np.int64)
        ex_offset = np.concatenate([[0], np.cumsum(ex_sizes)[:-1]]).astype(np.int64)
        self.base = np.stack([g.base for g in ordered])
        self.next_root = np.stack([g.next_root for g in ordered])
        self.provisional = np.concatenate([g.provisional for g in ordered])
        self.ptr = np.concatenate([g.ptr[:-1] + o for g, o in zip(ordered, ex_offset)] + [[ex_sizes.sum()]])
        self.ex_token = np.concatenate([g.ex_token for g in ordered])
        self.ex_next = np.concatenate([g.ex_next for g in ordered])
        self.ex_delta = np.concatenate([g.ex_delta for g in ordered])

    @classmethod
    def of(cls, graphs: Sequence[ContextGraph | None], symbols: int,
           previous: "ContextBatch | None" = None) -> "ContextBatch | None":
        """``None`` when no stream has phrases (the decoders then take their unbiased path).
        ``previous``: the batch of an earlier step, whose joined arrays are reused when it joined
        exactly these graphs (the usual case: the same streams step after step)."""
        return cls(graphs, symbols, previous) if any(g is not None for g in graphs) else None

    def biased(self, rows_stream: np.ndarray) -> np.ndarray:
        """Which rows belong to a stream with phrases."""
        return self.graph_of[rows_stream] >= 0

    def _exceptions(self, rows_stream: np.ndarray, nodes: np.ndarray):
        graph = self.graph_of[rows_stream]
        g = self.node_offset[graph] + nodes
        start = self.ptr[g]
        count = self.ptr[g + 1] - start
        total = int(count.sum())
        row = np.repeat(np.arange(len(g)), count)
        pos = np.arange(total) - np.repeat(np.cumsum(count) - count, count) + np.repeat(start, count)
        return graph, g, row, pos

    def bonus(self, rows_stream: np.ndarray, nodes: np.ndarray, forward_only: bool = False) -> np.ndarray:
        """``(R, symbols)`` float32: the change of the running bonus for every symbol, for rows of
        streams with phrases at ``nodes``. ``forward_only``: no negative entries (what a token
        earns, without the give-back of a match it breaks), for greedy decoding."""
        graph, g, row, pos = self._exceptions(rows_stream, nodes)
        out = self.base[graph] - self.provisional[g][:, None]
        out[row, self.ex_token[pos]] = self.ex_delta[pos]
        if forward_only:
            np.maximum(out, 0.0, out=out)
        return out

    def in_match(self, rows_stream: np.ndarray, nodes: np.ndarray) -> np.ndarray:
        """Whether each row is inside an unfinished match (its node holds a provisional bonus)."""
        return self.provisional[self.node_offset[self.graph_of[rows_stream]] + nodes] > 0

    def rows(self, rows_stream: np.ndarray, nodes: np.ndarray,
             forward_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``bonus`` and ``advance`` for every symbol at once: ``(R, symbols)`` float32 bonus rows
        and ``(R, symbols)`` next nodes."""
        graph, g, row, pos = self._exceptions(rows_stream, nodes)
        bonus = self.base[graph] - self.provisional[g][:, None]
        nxt = self.next_root[graph]
        tokens = self.ex_token[pos]
        bonus[row, tokens] = self.ex_delta[pos]
        nxt[row, tokens] = self.ex_next[pos]
        if forward_only:
            np.maximum(bonus, 0.0, out=bonus)
        return bonus, nxt

    def advance(self, rows_stream: np.ndarray, nodes: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """The nodes after ``tokens`` (non-blank), for rows of streams with phrases."""
        graph, g, row, pos = self._exceptions(rows_stream, nodes)
        out = self.next_root[graph, tokens]
        hit = self.ex_token[pos] == tokens[row]
        out[row[hit]] = self.ex_next[pos[hit]]
        return out
