"""How far a reduced precision moves the full-size model from fp32: encoder error, token agreement.

For each precision, streams every file of ``bench/audio`` (real speech) through the
engine chunk by chunk, greedy, and compares with fp32: the relative error of the
encoder output (the start-up self-check's measure, on real audio here) and the token
agreement, ``1 - edit distance / fp32 tokens`` over all files.

    .venv/bin/python -m bench.precision_agreement [--model random-base]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import soundfile
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.types import DecodingMethod  # noqa: E402
from server.model.engine import ChunkWork, Engine  # noqa: E402
from server.model.features import utterance_windows  # noqa: E402
from server.model.loading import load_model  # noqa: E402
from server.kernels.probes import relative_error  # noqa: E402


def edit_distance(a: list[int], b: list[int]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def run(engine: Engine, waves: list[np.ndarray]) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens and encoder outputs of each file, streamed one chunk at a time."""
    tokens, encoded = [], []
    original = engine.encoder.forward
    outputs: list[torch.Tensor] = []

    def capture(*args, **kwargs):
        out = original(*args, **kwargs)
        outputs.append(out.float().clone())
        return out

    engine.encoder.forward = capture
    try:
        for wave in waves:
            outputs.clear()
            stream = engine.new_stream(DecodingMethod.GREEDY, 1)
            for window in utterance_windows(torch.from_numpy(wave)).numpy():
                result = engine.run_batch([ChunkWork(stream, window)])[0]
            engine.release(stream)
            tokens.append(list(result.best.tokens))
            encoded.append(torch.cat(outputs, dim=1))
    finally:
        engine.encoder.forward = original
    return tokens, encoded


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.precision_agreement", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random-base")
    p.add_argument("--precisions", nargs="+", default=["bf16", "int8"])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "precision_agreement.json")
    args = p.parse_args(argv)
    model = load_model(args.model)
    waves = [soundfile.read(str(f), dtype="float32")[0] for f in sorted((ROOT / "bench" / "audio").glob("*.wav"))]
    with torch.inference_mode():
        ref_tokens, ref_encoded = run(Engine(model, precision="fp32"), waves)
        results = {"model": args.model, "files": len(waves), "fp32_tokens": sum(map(len, ref_tokens))}
        for precision in args.precisions:
            tokens, encoded = run(Engine(model, precision=precision), waves)
            errors = sum(edit_distance(r, t) for r, t in zip(ref_tokens, tokens))
            rel = relative_error(torch.cat(ref_encoded, dim=1), torch.cat(encoded, dim=1))
            results[precision] = {"encoder_relative_error": round(rel, 5),
                                  "token_agreement": round(1 - errors / max(1, results["fp32_tokens"]), 4),
                                  "identical_files": sum(r == t for r, t in zip(ref_tokens, tokens))}
            print(f"{precision}: encoder relative error {rel:.2e}, token agreement "
                  f"{results[precision]['token_agreement']:.2%}, identical transcripts "
                  f"{results[precision]['identical_files']}/{len(waves)}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
