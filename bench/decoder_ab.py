"""The beam search of a git revision against the working tree's, on the same encoder output.

One engine (``--model``, ``--precision``, ``--kernels``) runs B beam-search streams of
``bench/audio`` (each stream its own offset into the speech); at every step, the encoder output of
the chunk is decoded twice from the same decoder states: by the ``BeamSearchDecoder`` of
``server/model/decoder.py`` at ``--baseline`` (read with ``git show``) and by the working tree's,
in alternating order. Both use the engine's predictor and joiner, so the figures compare the search
and how it batches its network calls, not the kernels. Every step's hypotheses (tokens, frames,
scores, confidences) must be identical, or the run fails. Prints, per B: the median decode time
of each (thread CPU time: the machine's other load moves it less than wall time), the ratio
working tree / baseline, and the predictor and joiner calls and rows per step.

    .venv/bin/python -m bench.decoder_ab --baseline HEAD [--streams 1 4 8 16] [--precision fp32]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.capacity import _cut, _waves  # noqa: E402
from server.model import decoder as current  # noqa: E402
from server.model.engine import ChunkWork, Engine  # noqa: E402
from server.model.loading import load_model  # noqa: E402
from server.types import DecodingMethod  # noqa: E402


def baseline_module(revision: str, into: Path):
    """``server/model/decoder.py`` of ``revision``, imported as a module of its own."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:server/model/decoder.py"],
                            check=True, capture_output=True, text=True).stdout
    path = into / "decoder_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("decoder_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class _Counted:
    """The engine's predictor with its calls and rows counted per side."""

    def __init__(self, predictor):
        self.step, self.join = predictor.step, predictor.join
        self.side = "baseline"
        self.counts = {side: np.zeros(4) for side in ("baseline", "current")}  # calls, rows: predictor, joiner
        predictor.step, predictor.join = self.counted_step, self.counted_join

    def counted_step(self, tokens, state):
        self.counts[self.side] += (1, tokens.numel(), 0, 0)
        return self.step(tokens, state)

    def counted_join(self, encoder_rows, predictor_rows):
        self.counts[self.side] += (0, 0, 1, encoder_rows.size(0))
        return self.join(encoder_rows, predictor_rows)


def _snapshot(states) -> list:
    return [[(h.tokens, h.frames, h.score, h.token_prob_sum) for h in s.hypotheses] for s in states]


def compare(engine: Engine, baseline, streams: int, beam: int, steps: int, warm: int, windows) -> dict:
    counter = _Counted(engine.predictor)
    decoders = {"baseline": baseline.BeamSearchDecoder(engine.predictor, engine.beam.step_max_tokens),
                "current": engine.beam}
    times: dict[str, list[float]] = {"baseline": [], "current": []}
    recording = [False]

    def both(encoder_out, states, first_frames, beam_widths):
        copies = [current.DecoderState(list(s.hypotheses), dict(s.predictor_cache), s.context) for s in states]
        order = [("baseline", copies), ("current", states)]
        if len(times["current"]) % 2:
            order.reverse()
        for side, mine in order:
            counter.side = side
            t = time.thread_time()
            decoders[side].step(encoder_out, mine, first_frames, beam_widths)
            if recording[0]:
                times[side].append(time.thread_time() - t)
        if _snapshot(copies) != _snapshot(states):
            raise SystemExit(f"decoder_ab: the two beam searches disagree at {streams} streams")

    engine.beam = type("BothDecoders", (), {"step": staticmethod(both), "new_state": decoders["current"].new_state})()
    try:
        works = [engine.new_stream(DecodingMethod.BEAM_SEARCH, beam) for _ in range(streams)]
        for r in range(warm + steps):
            recording[0] = r >= warm
            if r == warm:
                for side in counter.counts:
                    counter.counts[side][:] = 0
            engine.run_batch([ChunkWork(s, windows[(r + 7 * i) % len(windows)]) for i, s in enumerate(works)])
        for s in works:
            engine.release(s)
    finally:
        engine.beam = decoders["current"]
        engine.predictor.step, engine.predictor.join = counter.step, counter.join
    out = {"streams": streams}
    for side in ("baseline", "current"):
        c = counter.counts[side] / steps
        out[side] = {"decode_ms": round(float(np.median(times[side])) * 1000, 2),
                     "predictor_calls": round(c[0], 2), "predictor_rows": round(c[1], 1),
                     "joiner_calls": round(c[2], 2), "joiner_rows": round(c[3], 1)}
    out["ratio"] = round(out["current"]["decode_ms"] / out["baseline"]["decode_ms"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="HEAD", help="git revision of the baseline decoder.py")
    parser.add_argument("--model", default="random-base")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--kernels", default="auto")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=20, help="measured steps per stream count")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        baseline = baseline_module(args.baseline, Path(tmp))
    engine = Engine(load_model(args.model), precision=args.precision, kernels=args.kernels)
    windows = [w for audio in _waves() for w in _cut(audio)]
    rows = []
    for n in args.streams:
        row = compare(engine, baseline, n, args.beam, args.steps, 4, windows)
        rows.append(row)
        b, c = row["baseline"], row["current"]
        print(f"B={n:3d}  baseline {b['decode_ms']:7.2f} ms  current {c['decode_ms']:7.2f} ms  ratio {row['ratio']:.3f}"
              f"  | per step: predictor calls {b['predictor_calls']} -> {c['predictor_calls']}, rows "
              f"{b['predictor_rows']} -> {c['predictor_rows']}; joiner calls {b['joiner_calls']} -> "
              f"{c['joiner_calls']}, rows {b['joiner_rows']} -> {c['joiner_rows']}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"baseline": args.baseline, "model": args.model, "precision": args.precision,
                                        "kernels": engine.kernels, "threads": args.threads, "beam": args.beam,
                                        "results": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
