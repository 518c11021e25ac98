"""Step cost of contextual biasing: one engine step of N streams each with P phrases, against the
same streams with none (demo model, the biasing test set's audio, so that the decoders emit text).

Each stream decodes the same audio both ways (an utterance of ``tests/data/bias-phrases`` repeated to
``--seconds``); stream i's phrases are ``P - 1`` of the unrelated phrases (a different window of the
list for each stream) plus its utterance's own phrase. Runs alternate (none, phrases, none, ...)
so that drift from other load on the machine falls on both; the figure of each is the median step
over all its runs. Prints the step and its decoder part in ms, the ratio with phrases / without
(which includes the different search the phrases cause: other tokens, other beam expansions), and
the biasing code's own share of the steps with phrases (timed around its entry points).

    .venv/bin/python -m bench.biasing_step [--streams 16] [--phrases 100] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

from server.model.engine import ChunkWork, Engine
from server.model.features import utterance_windows
from server.model.loading import load_model
from server.types import DecodingMethod

ROOT = Path(__file__).resolve().parent.parent
BIAS_SET = ROOT / "tests" / "data" / "bias-phrases"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--phrases", type=int, default=100, help="phrases per stream")
    parser.add_argument("--boost", type=float, default=4.0)
    parser.add_argument("--seconds", type=float, default=8.0, help="audio per stream and run")
    parser.add_argument("--runs", type=int, default=3, help="runs of each configuration (alternating)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--model", default="demo")
    args = parser.parse_args()

    items = [json.loads(line) for line in (BIAS_SET / "manifest.jsonl").read_text().splitlines() if line.strip()]
    unrelated = [p.strip() for p in (BIAS_SET / "unrelated.txt").read_text().splitlines() if p.strip()]
    engine = Engine(load_model(args.model), threads=args.threads)
    windows, graphs = [], []
    for i in range(args.streams):
        item = items[i % len(items)]
        audio = soundfile.read(BIAS_SET / item["audio"], dtype="float32")[0]
        audio = np.tile(audio, int(np.ceil(args.seconds * 16000 / len(audio))))[:int(args.seconds * 16000)]
        windows.append(utterance_windows(torch.from_numpy(audio)).numpy())
        own = [unrelated[(i * 7 + k) % len(unrelated)] for k in range(args.phrases - 1)]
        started = time.perf_counter()
        graphs.append(engine.context_graph(engine.context_phrases([(p, args.boost) for p in own + [item["phrase"]]])))
        build_ms = (time.perf_counter() - started) * 1000
    steps = min(len(w) for w in windows)
    print(f"{args.streams} streams x {steps} steps ({args.seconds:g} s of audio each), {args.phrases} phrases per "
          f"stream (automaton: {graphs[-1].num_nodes} nodes, built in {build_ms:.1f} ms), boost {args.boost:g}, "
          f"{engine.threads} torch threads, model {args.model}")

    def run(method: DecodingMethod, beam: int, with_phrases: bool) -> tuple[list[float], list[float]]:
        streams = [engine.new_stream(method, beam, None, g if with_phrases else None) for g in graphs]
        totals, decoders = [], []
        for step in range(steps):
            results = engine.run_batch([ChunkWork(s, w[step]) for s, w in zip(streams, windows)])
            if step >= 2:  # the first steps allocate
                totals.append(results[0].step_stats.total)
                decoders.append(results[0].step_stats.decoder)
        emitted[with_phrases] += sum(len(s.decoder.best.tokens) for s in streams)
        for s in streams:
            engine.release(s)
        return totals, decoders

    # the biasing code's own time (joining the step's automata, bonus rows and next nodes), timed
    # around its two entry points: a share of the step that other load on the machine inflates
    # no more than it inflates the step
    from server.model import decoder
    from server.model.context_graph import ContextBatch

    spent = [0.0]

    def timed(function):
        def wrapper(*a, **k):
            started = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                spent[0] += time.perf_counter() - started
        return wrapper

    decoder._context_rows = timed(decoder._context_rows)
    decoder.ContextBatch = type("TimedContextBatch", (), {"of": staticmethod(timed(ContextBatch.of))})
    engine.warmup()
    emitted = {False: 0, True: 0}  # tokens of the last utterance of each stream, all runs
    for method, beam, name in ((DecodingMethod.GREEDY, 1, "greedy"), (DecodingMethod.BEAM_SEARCH, 4, "beam 4")):
        figures = {False: ([], []), True: ([], [])}
        biased_seconds = biasing_seconds = 0.0
        for _ in range(args.runs):
            for with_phrases in (False, True):
                spent[0] = 0.0
                started = time.perf_counter()
                totals, decoders = run(method, beam, with_phrases)
                if with_phrases:
                    biased_seconds += time.perf_counter() - started
                    biasing_seconds += spent[0]
                figures[with_phrases][0].extend(totals)
                figures[with_phrases][1].extend(decoders)
        none_total, none_dec = (float(np.median(x)) * 1000 for x in figures[False])
        with_total, with_dec = (float(np.median(x)) * 1000 for x in figures[True])
        print(f"{name}: step {none_total:.2f} ms without phrases, {with_total:.2f} ms with: x{with_total / none_total:.3f}"
              f" (decoder {none_dec:.2f} -> {with_dec:.2f} ms, x{with_dec / none_dec:.3f}); the biasing code's own "
              f"time: {100 * biasing_seconds / biased_seconds:.2f} % of the steps with phrases; tokens in the "
              f"streams' last utterances {emitted[False]} -> {emitted[True]}", flush=True)
        emitted.update({False: 0, True: 0})


if __name__ == "__main__":
    main()
