"""int8 weight range on the avx2 path: what summing four u8 x s8 products in 16 bits would cost.

The avx2 back end's exact int8 product (``server/kernels/native/simd_avx2.h``, ``Int8Tiles``) spends
three instructions on every 32 multiply-adds: ``vpmaddubsw`` (u8 x s8 pairs summed in 16 bits),
``vpmaddwd`` (16 to 32 bits) and ``vpaddd``; weights to +-63 keep each pair sum exact
(2 x 255 x 63 = 32 130 <= 32 767). Adding two ``vpmaddubsw`` results in 16 bits before widening
(five instructions per 64 multiply-adds instead of six, three multiplies instead of four) needs
weights to +-31 (4 x 255 x 31 = 31 620). The kernel already sums any narrower weight range exactly,
so this measures that accuracy cost alone, with the server's weights quantised to each range:

* the start-up self-check's relative error (``Engine.self_check``) for each of ``--models``;
* greedy WER of the demo model on its whole held-out split (600 utterances, synthesized afresh by
  ``train/make_data.py``), through a real server, beside fp32 on the same path.

    .venv/bin/python -m bench.int8_weight_range      # bench/results/int8_weight_range.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from asr.v1 import asr_pb2  # noqa: E402
from bench.biasing import cpu_description  # noqa: E402
from client.eval import evaluate, load_manifest  # noqa: E402
from client.spawn import spawned_server  # noqa: E402
from client.stream import StreamOptions  # noqa: E402
import server.kernels.native as native  # noqa: E402


@contextlib.contextmanager
def weights_to(weight_max: int):
    """Native ``RowwiseInt8Linear``s built inside quantise their weights to +-``weight_max``."""
    original = native.int8_weight_max
    if weight_max > original():
        raise ValueError(f"the active back end sums weights up to {original()} exactly, not {weight_max}")
    native.int8_weight_max = lambda: weight_max
    try:
        yield
    finally:
        native.int8_weight_max = original


def self_check_errors(models: list[str], weights: list[int], kernels: str) -> dict:
    from server.model.engine import Engine
    from server.model.loading import load_model

    native.select(kernels)
    errors = {}
    for spec in models:
        model = load_model(spec)
        for weight_max in weights:
            with weights_to(weight_max):
                errors[f"{spec} +-{weight_max}"] = Engine(model, precision="int8").self_check(max_error=1.0)
            print(f"self-check {spec:12s} weights to +-{weight_max:3d}: relative error "
                  f"{errors[f'{spec} +-{weight_max}']:.3e}", flush=True)
    return errors


def heldout_wer(address: str, manifest: Path) -> dict:
    options = StreamOptions(realtime=False, interim_results=False, endpointing=False,
                            decoding_method=asr_pb2.GREEDY)
    result = asyncio.run(evaluate(address, load_manifest(manifest), options, concurrency=8, progress=False))
    return {k: result[k] for k in ("utterances", "words", "wer", "substitutions", "deletions", "insertions")}


def wers(weights: list[int], kernels: str, manifest: Path) -> dict:
    args = ["--model", "demo", "--kernels", kernels, "--metrics-port", "-1"]
    env = {"ASR_LATENCY_BUDGET_MS": "0"}
    results = {}
    with spawned_server(*args, "--precision", "fp32", env=env) as (address, _):
        results["fp32"] = heldout_wer(address, manifest)
    print(f"held-out WER fp32:                {results['fp32']['wer']:.2%}", flush=True)
    for weight_max in weights:
        serve = [sys.executable, "-m", "bench.int8_weight_range", "--serve", str(weight_max)]
        with spawned_server(*args, "--precision", "int8", env=env, command=serve) as (address, _):
            results[f"int8 +-{weight_max}"] = heldout_wer(address, manifest)
        print(f"held-out WER int8, weights to +-{weight_max:3d}: {results[f'int8 +-{weight_max}']['wer']:.2%}",
              flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:  # a server whose int8 weights go to +-argv[1] (``wers``)
        from server.cli import main as serve

        with weights_to(int(argv[1])):
            return serve(argv[2:])
    p = argparse.ArgumentParser(prog="bench.int8_weight_range", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=int, nargs="+", default=[63, 31], help="weight ranges (+-N)")
    p.add_argument("--kernels", default="avx2", choices=native.BACKENDS)
    p.add_argument("--models", nargs="+", default=["demo", "random-base"], help="models for the self-check")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "int8_weight_range.json")
    args = p.parse_args(argv)
    start = time.monotonic()
    record = {"command": " ".join(["bench.int8_weight_range", *argv]), "machine": cpu_description(),
              "kernels": args.kernels, "self_check": self_check_errors(args.models, args.weights, args.kernels)}
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, str(ROOT / "train" / "make_data.py"), "--out", tmp, "--splits", "test"],
                       check=True, capture_output=True)
        record["heldout_greedy"] = wers(args.weights, args.kernels, Path(tmp) / "test.jsonl")
    record["minutes"] = round((time.monotonic() - start) / 60, 1)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"results: {args.out} ({record['minutes']} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
