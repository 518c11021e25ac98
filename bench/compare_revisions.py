"""Before / after: the same load against the server of two code revisions, trials interleaved.

On a shared machine the speed drifts by tens of percent within minutes, so two
capacity searches run one after the other can disagree more than the code does.
This tool checks out ``--baseline`` (any git revision) into a temporary worktree,
starts one ``asr-server --model random-base`` from it and one from the working
tree, per configuration, and runs the load tester (``client.loadtest.run_load``,
real-time paced streams of ``bench/audio``) against each in turn, trial by trial,
for every stream count in ``--streams``, ``--rounds`` times. It prints the
server-side chunk latency (p50 / p99) and the stream RTF of each side, and the
median over the rounds, and writes them as JSON. Without ``--baseline`` both sides
run the working tree, and ``--baseline-args`` / ``--current-args`` (extra server
options) make the difference: the same interleaved A/B for a server setting.

    .venv/bin/python -m bench.compare_revisions --baseline b8a99a0 --configs greedy:fp32,greedy:int8 --streams 2 4 8
    .venv/bin/python -m bench.compare_revisions --baseline-args="--threads 1" --streams 4 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from asr.v1 import asr_pb2  # noqa: E402
from bench.capacity import AUDIO, parse_config  # noqa: E402
from client.loadtest import load_audio, run_load  # noqa: E402
from client.spawn import spawned_server  # noqa: E402
from client.stream import StreamOptions  # noqa: E402


def worktree(revision: str, into: Path) -> Path:
    """A detached checkout of ``revision`` with its native kernels built in place (about a minute
    and a half on 2 cores; without them its server could run no --kernels path but torch).
    Removed by the caller with ``git worktree remove``."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(into), revision],
                   check=True, capture_output=True)
    print(f"building the native kernels of {revision} ...", file=sys.stderr, flush=True)
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=into,
                           capture_output=True, text=True)
    if build.returncode != 0:
        raise RuntimeError(f"building {revision}'s native kernels failed:\n{build.stderr[-2000:]}")
    return into


async def compare(config: str, trees: dict[str, Path], streams: list[int], rounds: int, duration: float,
                  extra_args: dict[str, list[str]] | None = None) -> dict:
    """``trees``: side name -> source tree of its server; ``extra_args``: side name -> extra
    ``asr-server`` options. Returns ``{streams: {side: [trial, ...]}}``."""
    method, beam, precision = parse_config(config)
    precision, _, kernel = precision.partition("-")
    args = ["--model", "random-base", "--precision", precision, "--int8-kernel", kernel or "rowwise",
            "--latency-budget-ms", "0", "--max-batch", "64"]
    options = StreamOptions(realtime=True, interim_results=True,
                            decoding_method=asr_pb2.GREEDY if method == "greedy" else asr_pb2.BEAM_SEARCH,
                            beam_width=beam if method == "beam" else 0)
    audio = load_audio(AUDIO)
    out: dict = {n: {side: [] for side in trees} for n in streams}
    extra_args = extra_args or {}
    servers = {side: spawned_server(*args, *extra_args.get(side, []), env={"PYTHONPATH": str(tree)})
               for side, tree in trees.items()}
    entered = {side: ctx.__enter__() for side, ctx in servers.items()}
    try:
        for r in range(rounds):
            for n in streams:
                for side, (address, proc) in entered.items():
                    summary = (await run_load(address, audio, n, duration, 2.0, options, proc.pid,
                                              progress=False, seed=n + 100 * r)).summary()
                    row = {"p50": summary["server_chunk_latency_ms"]["p50"],
                           "p99": summary["server_chunk_latency_ms"]["p99"],
                           "rtf": summary["stream_rtf"]["p50"], "batch": summary["batch_size"]["mean"]}
                    out[n][side].append(row)
                    print(f"{config} round {r + 1} N={n:>3} {side:<9} p50 {row['p50']:6.1f}  p99 {row['p99']:6.1f} ms"
                          f"  RTF {row['rtf']:.3f}  batch {row['batch']:.1f}", file=sys.stderr, flush=True)
    finally:
        for ctx in servers.values():
            ctx.__exit__(None, None, None)
    return out


def median_table(results: dict) -> str:
    lines = [f"{'config':<16}{'N':>4}  {'baseline p50/p99':>18}  {'current p50/p99':>18}  {'p99 ratio':>9}"]
    for config, per_n in results.items():
        for n, sides in per_n.items():
            med = {side: (np.median([t["p50"] for t in ts]), np.median([t["p99"] for t in ts]))
                   for side, ts in sides.items()}
            b, c = med["baseline"], med["current"]
            lines.append(f"{config:<16}{n:>4}  {b[0]:8.1f} / {b[1]:7.1f}  {c[0]:8.1f} / {c[1]:7.1f}  "
                         f"{c[1] / b[1]:9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.compare_revisions", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", help="git revision to compare the working tree with "
                   "(default: the working tree itself, with --baseline-args)")
    p.add_argument("--baseline-args", default="", help="extra asr-server options of the baseline side")
    p.add_argument("--current-args", default="", help="extra asr-server options of the current side")
    p.add_argument("--configs", default="greedy:fp32", help="comma-separated METHOD:PRECISION (see bench.capacity)")
    p.add_argument("--streams", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--rounds", type=int, default=2, help="trials per side and stream count")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per trial after the ramp-up")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compare_revisions.json")
    args = p.parse_args(argv)
    if not args.baseline and args.baseline_args == args.current_args:
        p.error("give --baseline (a revision) or different --baseline-args / --current-args")
    extra = {"baseline": shlex.split(args.baseline_args), "current": shlex.split(args.current_args)}
    with tempfile.TemporaryDirectory() as tmp:
        base = worktree(args.baseline, Path(tmp) / "baseline") if args.baseline else ROOT
        try:
            trees = {"baseline": base, "current": ROOT}
            results = {c: asyncio.run(compare(c, trees, args.streams, args.rounds, args.duration, extra))
                       for c in args.configs.split(",")}
        finally:
            if args.baseline:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"baseline": args.baseline or "working tree", "streams": args.streams,
                                    "rounds": args.rounds, "duration_s": args.duration,
                                    "baseline_args": args.baseline_args, "current_args": args.current_args,
                                    "results": results}, indent=2) + "\n")
    print(median_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
