"""The context graph (server.model.context_graph): its running bonus against a brute-force
definition, the give-back of a broken match, and the batched lookups against the graph's own."""

import random

import numpy as np
import pytest

from server.model.context_graph import (ContextBatch, ContextGraph, Phrase, PhraseError, phrase_tokens,
                                        separator_token)
from server.model.vocabulary import CharTokenTable, SyntheticTokenTable


def phrase(tokens, boost=1.0):
    return Phrase(tuple(tokens), tuple([boost] * len(tokens)))


def reference_bonus(phrases: list[Phrase], tokens: list[int]) -> float:
    """The running bonus by its definition, with no automaton: the node is the longest suffix of
    the tokens that is a prefix of a phrase; following a phrase earns its edge, a completed
    phrase's bonus is kept, breaking off gives back the unfinished part."""
    edge: dict[tuple, float] = {}
    ends = {p.tokens for p in phrases}
    for p in phrases:
        for i, b in enumerate(p.bonuses):
            key = p.tokens[:i + 1]
            edge[key] = max(edge.get(key, -np.inf), b)

    def score(path):
        return sum(edge[path[:i + 1]] for i in range(len(path)))

    def locked(path):
        done = [i for i in range(1, len(path) + 1) if path[:i] in ends]
        return score(path[:done[-1]]) if done else 0.0

    def state(seq):
        for i in range(len(seq) + 1):
            if tuple(seq[i:]) in edge or i == len(seq):
                return tuple(seq[i:])

    total_locked, node = 0.0, ()
    for k in range(len(tokens)):
        new = state(tokens[:k + 1])
        if new == node + (tokens[k],):  # followed a phrase
            total_locked += locked(new) - locked(node)
        else:  # broke off: what the new suffix completed is earned
            total_locked += locked(new)
        node = new
    return total_locked + score(node) - locked(node)


def test_follow_complete_and_give_back():
    graph = ContextGraph([phrase([0, 1, 2], 2.0)], symbols=5)
    node, bonus = graph.walk([0, 1])
    assert bonus == pytest.approx(4.0)
    _, broken = graph.walk([3], node)
    assert broken == pytest.approx(-4.0)  # the unfinished match is given back
    node, bonus = graph.walk([0, 1, 2])
    assert bonus == pytest.approx(6.0)
    _, after = graph.walk([3, 4], node)
    assert after == pytest.approx(0.0)  # a completed phrase keeps its bonus
    _, restart = graph.walk([0, 1, 0])  # breaks off, and starts the phrase again
    assert restart == pytest.approx(2.0)


def test_overlapping_phrases_through_failure_links():
    # "abd" and "bc": at "ab", a "c" breaks "abd" off and completes "bc" via the failure link
    graph = ContextGraph([phrase([0, 1, 3]), phrase([1, 2])], symbols=4)
    node, bonus = graph.walk([0, 1, 2])
    assert bonus == pytest.approx(2.0)
    assert graph.provisional[node] == 0.0


def test_running_bonus_matches_the_definition_on_random_phrases():
    rng = random.Random(7)
    for _ in range(60):
        symbols = rng.randint(2, 5)
        phrases = [Phrase(tuple(rng.randrange(symbols) for _ in range(rng.randint(1, 5))),
                          tuple(rng.choice([0.5, 1.0, 2.5]) for _ in range(5)))
                   for _ in range(rng.randint(1, 6))]
        phrases = [Phrase(p.tokens, p.bonuses[:len(p.tokens)]) for p in phrases]
        graph = ContextGraph(phrases, symbols)
        for _ in range(20):
            tokens = [rng.randrange(symbols) for _ in range(rng.randint(0, 14))]
            _, total = graph.walk(tokens)
            assert total == pytest.approx(reference_bonus(phrases, tokens), abs=1e-4), (phrases, tokens)


def test_batch_lookups_equal_the_graph_steps():
    rng = random.Random(3)
    symbols = 6
    graphs = [ContextGraph([phrase([rng.randrange(symbols) for _ in range(rng.randint(1, 6))], rng.choice([1.0, 3.0]))
                            for _ in range(rng.randint(1, 8))], symbols) for _ in range(3)]
    streams = [graphs[0], None, graphs[1], graphs[0], graphs[2]]
    batch = ContextBatch(streams, symbols)
    rows = np.array([s for s in range(len(streams)) if streams[s] is not None for _ in range(5)])
    nodes = np.array([rng.randrange(streams[s].num_nodes) for s in rows])
    bonus = batch.bonus(rows, nodes)
    forward = batch.bonus(rows, nodes, forward_only=True)
    for r, (s, node) in enumerate(zip(rows, nodes)):
        for token in range(symbols):
            nxt, delta = streams[s].step(int(node), token)
            assert bonus[r, token] == pytest.approx(delta)
            assert forward[r, token] == pytest.approx(max(delta, 0.0))
    tokens = np.array([rng.randrange(symbols) for _ in rows])
    advanced = batch.advance(rows, nodes, tokens)
    assert advanced.tolist() == [streams[s].step(int(n), int(t))[0] for s, n, t in zip(rows, nodes, tokens)]
    assert batch.in_match(rows, nodes).tolist() == [bool(streams[s].provisional[n] > 0) for s, n in zip(rows, nodes)]
    both = batch.rows(rows, nodes)
    assert np.array_equal(both[0], bonus) and both[1].tolist() == [
        [streams[s].step(int(n), t)[0] for t in range(symbols)] for s, n in zip(rows, nodes)]
    assert batch.biased(np.arange(len(streams))).tolist() == [True, False, True, True, True]
    assert ContextBatch.of([None, None], symbols) is None
    # the next step with the same graphs (in another order) reuses the joined arrays
    again = ContextBatch.of([graphs[2], graphs[0], None, graphs[1]], symbols, previous=batch)
    assert again.ex_token is batch.ex_token
    assert again.rows(np.array([0, 3]), np.array([1, 1]))[1].tolist() == [
        [g.step(1, t)[0] for t in range(symbols)] for g in (graphs[2], graphs[1])]
    other = ContextBatch.of([graphs[2], None], symbols, previous=batch)
    assert other.ex_token is not batch.ex_token


def test_char_vocabulary_phrases_start_at_a_word():
    table = CharTokenTable.default()
    space = separator_token(table)
    tokens = phrase_tokens(table, "  Kubernetes ")
    assert tokens[0] == space and table.text(tokens) == "kubernetes"
    bonuses = (0.0,) + (1.0,) * (len(tokens) - 1)
    graph = ContextGraph([Phrase(tuple(tokens), bonuses)], table.size - 1, start=[space])
    # at the start of an utterance and after a space, the word earns its bonus
    assert graph.walk(tokens[1:])[1] == pytest.approx(len(tokens) - 1)
    assert graph.walk(table.encode("my kubernetes"))[1] == pytest.approx(len(tokens) - 1)
    # inside another word it does not
    assert graph.walk(table.encode("xkubernetes"))[1] == pytest.approx(0.0)
    with pytest.raises(PhraseError, match="no token for"):
        phrase_tokens(table, "caf\u00e9")
    with pytest.raises(PhraseError, match="word"):
        phrase_tokens(table, "   ")


def test_synthetic_vocabulary_longest_piece_first():
    table = SyntheticTokenTable(64)
    text = table.text([0, 1, 2])
    assert table.text(phrase_tokens(table, text)) == text


def test_beam_results_rank_without_unfinished_matches():
    """A hypothesis ahead only by the bonus of a phrase it has not finished ranks behind one without."""
    from server.model.decoder import Hypothesis
    from server.model.engine import Engine

    graph = ContextGraph([phrase([0, 1, 2], 3.0)], symbols=4)
    unfinished, _ = graph.walk([3, 0, 1], node=0)  # provisional bonus 6
    finished, _ = graph.walk([3, 0, 1, 2], node=0)
    plain = Hypothesis((3, 3, 3), (), None, None, -2.0, context_node=0)
    partial = Hypothesis((3, 0, 1), (), None, None, -2.0 + 4.0, context_node=unfinished)
    complete = Hypothesis((3, 0, 1, 2), (), None, None, -2.0 + 4.0, context_node=finished)
    assert Engine._rank_without_unfinished([partial, plain], graph) == [plain, partial]
    assert Engine._rank_without_unfinished([plain, complete], graph) == [complete, plain]
