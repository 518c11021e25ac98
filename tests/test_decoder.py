"""Beam search reuses the predictor: an extension proposed again on a later frame costs no
predictor call, and the cache holds only the extensions of the live hypotheses.
(That the tokens equal torchaudio's ``RNNTBeamSearch`` is tests/test_equivalence.py.)"""

from __future__ import annotations

import numpy as np

from server.model.engine import ChunkWork, Engine
from server.model.loading import load_model
from server.types import SEGMENT_SAMPLES, WINDOW_SAMPLES, DecodingMethod


class _NoCache(dict):
    """A predictor cache that never keeps anything: torchaudio's cost, one predictor row per extension."""

    def __setitem__(self, key, value):
        pass


def _decode(engine: Engine, audio: np.ndarray, cached: bool) -> tuple[tuple[int, ...], int, list[bool]]:
    """(best tokens, predictor rows computed, per chunk: every cache key extends a live hypothesis)."""
    rows = []
    predictor = engine.beam.predictor
    step = predictor.step

    def counting_step(tokens, state):
        rows.append(len(tokens))
        return step(tokens, state)

    predictor.step = counting_step
    try:
        stream = engine.new_stream(DecodingMethod.BEAM_SEARCH, 4)
        if not cached:
            stream.decoder.predictor_cache = _NoCache()
        bounded = []
        for start in range(0, len(audio), SEGMENT_SAMPLES):
            window = audio[start:start + WINDOW_SAMPLES]
            engine.run_batch([ChunkWork(stream, np.pad(window, (0, WINDOW_SAMPLES - len(window))))])
            alive = {h.tokens for h in stream.decoder.hypotheses}
            bounded.append(all(key[:-1] in alive for key in stream.decoder.predictor_cache))
        tokens = stream.decoder.best.tokens
        engine.release(stream)
    finally:
        predictor.step = step
    return tokens, sum(rows), bounded


def test_beam_search_runs_the_predictor_once_per_token_sequence(speech):
    engine = Engine(load_model("demo"), precision="fp32")
    for name, audio, _ in speech:
        tokens, rows, bounded = _decode(engine, audio, cached=True)
        plain_tokens, plain_rows, _ = _decode(engine, audio, cached=False)
        assert tokens == plain_tokens and len(tokens) > 10, name
        assert all(bounded), name
        # most extensions recur on the next frames (measured: about three in four)
        assert rows < 0.6 * plain_rows, (name, rows, plain_rows)
