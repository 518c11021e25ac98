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
    pieces: dict[str, int] = {}
    for token in range(vocabulary.size - 1):
        piece = vocabulary.piece(token)
        if piece and piece not in pieces:
            pieces[piece] = token
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
        score = np.zeros(n, dtype=np.float64)  # bonus along the trie path from the root
        locked = np.zeros(n, dtype=np.float64)  # score of the deepest completed phrase on that path
        fail = [0] * n
        order = []  # breadth first, root excluded
        queue = deque()
        for token, child in children[0].items():
            queue.append(child)
        parent_of = {}
        for token, child in children[0].items():
            parent_of[child] = (0, token)
        while queue:
            node = queue.popleft()
            order.append(node)
            parent, token = parent_of[node]
            score[node] = score[parent] + edge_bonus[node]
            locked[node] = score[node] if is_end[node] else locked[parent]
            if parent != 0:
                f = fail[parent]
                while f and token not in children[f]:
                    f = fail[f]
                fail[node] = children[f].get(token, 0) if children[f].get(token, 0) != node else 0
            for t, c in children[node].items():
                parent_of[c] = (node, t)
                queue.append(c)
        provisional = score - locked
        # transitions: the root's, plus per node the tokens where it differs (children of the node
        # and of its failure chain); a node's exceptions extend those of its failure target
        next_root = np.zeros(symbols, dtype=np.int64)
        base = np.zeros(symbols, dtype=np.float64)
        for token, child in children[0].items():
            next_root[token] = child
            base[token] = score[child]
        exceptions: list[dict[int, tuple[int, float]]] = [dict() for _ in range(n)]
        for node in order:
            table: dict[int, tuple[int, float]] = {}
            for token, (target, _) in exceptions[fail[node]].items():  # breaking off via the failure link
                table[token] = (target, score[target] - provisional[node])
            for token, child in children[node].items():  # following the phrase
                table[token] = (child, score[child] - score[node])
            exceptions[node] = table
        counts = np.array([len(e) for e in exceptions], dtype=np.int64)
        self.ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.ex_token = np.array([t for e in exceptions for t in sorted(e)], dtype=np.int64)
        self.ex_next = np.array([e[t][0] for e in exceptions for t in sorted(e)], dtype=np.int64)
        self.ex_delta = np.array([e[t][1] for e in exceptions for t in sorted(e)], dtype=np.float32)
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

    def __init__(self, graphs: Sequence[ContextGraph | None], symbols: int):
        self.symbols = symbols
        present = [g for g in graphs if g is not None]
        distinct: dict[int, int] = {}
        for g in present:
            distinct.setdefault(id(g), len(distinct))
        unique = {id(g): g for g in present}
        ordered = sorted(unique.values(), key=lambda g: distinct[id(g)])
        self.graph_of = np.array([distinct[id(g)] if g is not None else -1 for g in graphs], dtype=np.int64)
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
    def of(cls, graphs: Sequence[ContextGraph | None], symbols: int) -> "ContextBatch | None":
        """``None`` when no stream has phrases (the decoders then take their unbiased path)."""
        return cls(graphs, symbols) if any(g is not None for g in graphs) else None

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
