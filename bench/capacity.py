"""``make bench``: how many real-time streams the server carries, against the seed loop.

For every configuration (decoding method x precision) in one run, on the same machine:

1. a step profile in-process (``bench.step_profile``): step time for B = 1..32 and the
   ``c0 + c * B`` fit, the share of matrix products and of state gather/scatter;
2. a real ``asr-server --model random-base`` (full-size Emformer, seeded random weights)
   spawned as a child process, and N real-time-paced streams of real speech
   (``bench/audio``) driven by the load tester (``client.loadtest.run_load``);
   capacity = the largest N whose p99 chunk latency stays <= 160 ms (the server's
   own figure: from the arrival of the chunk's last sample, look-ahead included, to
   its result leaving the server), found by search (``client.loadtest.find_capacity``)
   from the profile's estimate;
3. the seed loop (``bench.seed_loop``: torchaudio ``RNNTBeamSearch.infer``, beam 10,
   one stream at a time, no server) searched the same way, and the capacity ratios.

Results go to ``bench/results/latest.json``; BENCHMARKS.md summarises them.

    make bench                                   # the standard sweep (< 15 min here)
    .venv/bin/python -m bench.capacity --quick   # greedy fp32 only, short trials
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from asr.v1 import asr_pb2  # noqa: E402
from bench import seed_loop  # noqa: E402
from bench.step_profile import fit_step_cost, operator_profile  # noqa: E402
from client.loadtest import find_capacity, load_audio, run_load  # noqa: E402
from client.spawn import spawned_server  # noqa: E402
from client.stream import StreamOptions  # noqa: E402

AUDIO = ROOT / "bench" / "audio"
RESULTS = ROOT / "bench" / "results"
THRESHOLD_MS = 160.0
REPEAT_WITHIN = 0.10  # a trial whose p99 lies within 10 % of the threshold runs twice (find_capacity)
DEFAULT_CONFIGS = "greedy:fp32,beam4:fp32,greedy:bf16,greedy:int8,greedy:int8-fbgemm"


def cpu_description() -> dict:
    flags = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = line
                break
        model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    except OSError:
        model = platform.processor()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if f" {f}" in flags]
    return {"cpu": model, "cores": os.cpu_count(), "isa": isa, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "mkldnn": torch.backends.mkldnn.is_available(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def parse_config(spec: str) -> tuple[str, int, str]:
    """``greedy:fp32`` / ``beam4:int8`` / ``greedy:int8-fbgemm`` -> (method, beam width, precision[-kernel])."""
    method, _, precision = spec.partition(":")
    precision = precision or "fp32"
    if method == "greedy":
        return "greedy", 1, precision
    if method.startswith("beam") and method[4:].isdigit():
        return "beam", int(method[4:]), precision
    raise SystemExit(f"bench: bad configuration {spec!r} (use greedy:fp32, beam4:bf16, ...)")


def _server_judged(summary: dict) -> dict:
    """The load tester's summary, judged on the server-side chunk latency (BENCHMARKS.md, the method)."""
    return dict(summary, chunk_latency_ms=summary["server_chunk_latency_ms"],
                client_chunk_latency_ms=summary["chunk_latency_ms"])


def profile_engine(precision: str, method: str, beam: int, log, quick: bool, kernels: str = "auto",
                   model: str = "random-base") -> dict:
    from server.model.engine import Engine
    from server.model.loading import load_model
    from server.types import DecodingMethod

    precision, _, kernel = precision.partition("-")
    engine = Engine(load_model(model), precision=precision, int8_kernel=kernel or "rowwise", kernels=kernels)
    engine.warmup()
    speech = [a for a in _waves()]
    windows = [w for a in speech for w in _cut(a)]
    sizes = (1, 4, 16) if quick else (1, 2, 4, 8, 16, 32)
    cost = fit_step_cost(engine, sizes, repeats=3 if quick else 5,
                         method=DecodingMethod.GREEDY if method == "greedy" else DecodingMethod.BEAM_SEARCH,
                         beam=beam, windows=windows)
    out = {"step_cost": cost.as_dict()}
    if method == "greedy":
        out["operators"] = operator_profile(engine, batch=16, steps=2 if quick else 3)
    log(f"  step: c0 {cost.c0_ms:.1f} ms + {cost.c_ms:.2f} ms/stream "
        f"(B={sizes[-1]}: {cost.total_ms[-1]:.0f} ms; encoder {cost.encoder_ms[-1]:.0f}, decoder "
        f"{cost.decoder_ms[-1]:.0f}, features {cost.features_ms[-1]:.0f}); estimate {cost.estimated_capacity} streams"
        + (f"; matmul share {out['operators']['matmul_share']:.0%}, state gather/scatter "
           f"{out['operators']['state_gather_scatter_share']:.1%}" if "operators" in out else ""))
    del engine
    return out


def _waves() -> list[np.ndarray]:
    return [soundfile.read(str(p), dtype="float32")[0] for p in sorted(AUDIO.glob("*.wav"))]


def _cut(audio: np.ndarray) -> list[np.ndarray]:
    return [w.numpy() for w in seed_loop.windows(torch.from_numpy(audio))]


async def server_capacity(method: str, beam: int, precision: str, args, estimate: int, log) -> dict:
    audio = load_audio(AUDIO)
    options = StreamOptions(realtime=True, interim_results=True,
                            decoding_method=asr_pb2.GREEDY if method == "greedy" else asr_pb2.BEAM_SEARCH,
                            beam_width=beam if method == "beam" else 0)
    # Load shedding off (--latency-budget-ms 0): the search must see where latency breaks,
    # not where admission control would start refusing streams.
    precision, _, kernel = precision.partition("-")
    server_args = ["--model", args.model, "--precision", precision, "--int8-kernel", kernel or "rowwise",
                   "--kernels", args.kernels, "--max-batch", str(args.max_batch),
                   "--max-beam-width", str(max(16, beam)), "--latency-budget-ms", "0"]
    with spawned_server(*server_args) as (address, proc):
        summaries: dict[int, dict] = {}

        async def trial(n: int) -> dict:
            result = await run_load(address, audio, n, args.duration, args.ramp_up, options, proc.pid,
                                    progress=sys.stderr.isatty(), seed=n)
            summaries[n] = _server_judged(result.summary())
            return summaries[n]

        start = max(1, estimate // 2)
        capacity, trials = await find_capacity(trial, THRESHOLD_MS, start=start, max_streams=args.max_streams,
                                               log=lambda s: log("  " + s), repeat_within=args.repeat_within)
        if capacity == 0 and start > 1:  # the estimate was too optimistic: search from 1
            capacity, more = await find_capacity(trial, THRESHOLD_MS, start=1, max_streams=start,
                                                 log=lambda s: log("  " + s), repeat_within=args.repeat_within)
            trials += more
    at = summaries.get(capacity)
    return {"capacity": capacity, "at_capacity": _compact(at) if at else None,
            "trials": [_compact(t) for t in trials], "server_args": server_args}


def _compact(s: dict) -> dict:
    keep = ("streams", "chunk_latency_ms", "client_chunk_latency_ms", "time_to_first_result_ms",
            "final_result_latency_ms", "stream_rtf", "batch_size", "errors", "streams_completed",
            "audio_seconds", "tester_cpu_percent", "server_cpu_percent")
    out = {k: s.get(k) for k in keep}
    for key in ("chunk_latency_ms", "client_chunk_latency_ms", "time_to_first_result_ms",
                "final_result_latency_ms", "stream_rtf"):
        if out.get(key):
            out[key] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out[key].items()}
    return out


async def seed_capacity(args, log) -> dict:
    from server.model.loading import load_model

    model = load_model("random-base")
    waves = _waves()

    async def trial(n: int) -> dict:
        run = await asyncio.to_thread(seed_loop.simulate, model, waves, n, args.seed_duration, seed=n)
        return run.summary()

    capacity, trials = await find_capacity(trial, THRESHOLD_MS, start=1, max_streams=64,
                                           log=lambda s: log("  " + s), repeat_within=args.repeat_within)
    return {"capacity": capacity, "beam": seed_loop.SEED_BEAM, "trials": trials}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.capacity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help="comma-separated METHOD:PRECISION (greedy / beamN; fp32 / bf16 / int8) "
                        "(default: %(default)s)")
    p.add_argument("--duration", type=float, default=12.0, help="seconds per capacity trial after ramp-up")
    p.add_argument("--ramp-up", type=float, default=2.0, help="seconds over which a trial's streams start")
    p.add_argument("--seed-duration", type=float, default=10.0, help="seconds per seed-loop trial")
    p.add_argument("--max-streams", type=int, default=128, help="upper bound of every search")
    p.add_argument("--max-batch", type=int, default=64, help="server --max-batch")
    p.add_argument("--repeat-within", type=float, default=REPEAT_WITHIN,
                   help="run a trial again when its p99 lies within this fraction of 160 ms, and judge "
                        "by the mean of the two (0: every N once; default %(default)s)")
    p.add_argument("--kernels", default="auto", choices=("auto", "avx512", "avx2", "portable", "torch"),
                   help="the server's --kernels (e.g. avx2 on an AVX-512 machine measures the AVX2 path)")
    p.add_argument("--quick", action="store_true", help="greedy fp32 only, short trials (about 3 min)")
    p.add_argument("--no-seed", action="store_true", help="skip the seed-loop baseline")
    p.add_argument("--model", default="random-base", choices=("random-base", "random-base-moe"),
                   help="the server's model: the full-size Emformer with seeded random weights, or the same "
                        "with a Mixture-of-Experts feed-forward (docs/moe.md); the seed loop runs random-base")
    p.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    args = p.parse_args(argv)
    if args.quick:
        args.configs, args.duration, args.seed_duration = "greedy:fp32", 6.0, 6.0

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    started = time.time()
    machine = cpu_description()
    from server.kernels import native

    machine["kernels"] = native.resolve(args.kernels)
    log(f"machine: {machine['cpu']}, {machine['cores']} cores, {' '.join(machine['isa'])}; "
        f"torch {machine['torch']} ({machine['cpu_capability']} kernels); server kernels {machine['kernels']}")
    results: dict = {"machine": machine, "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                      for k, v in vars(args).items()},
                     "threshold_ms": THRESHOLD_MS, "configs": {}}
    if not args.no_seed:
        log("seed loop (torchaudio RNNTBeamSearch.infer, beam 10, one stream at a time):")
        results["seed"] = asyncio.run(seed_capacity(args, log))
        seed = results["seed"]
        log(f"  -> seed capacity {seed['capacity']}" + ("" if seed["capacity"] else
            f" (p99 {seed['trials'][0]['chunk_latency_ms']['p99']:.0f} ms with one stream: ratios to it are undefined)"))
    for spec in args.configs.split(","):
        method, beam, precision = parse_config(spec.strip())
        name = f"{'greedy' if method == 'greedy' else f'beam{beam}'}:{precision}"
        log(f"{name}:")
        entry = profile_engine(precision, method, beam, log, args.quick, args.kernels, args.model)
        entry.update(asyncio.run(server_capacity(method, beam, precision, args,
                                                 entry["step_cost"]["estimated_capacity"], log)))
        seed_cap = results.get("seed", {}).get("capacity")
        entry["ratio_to_seed"] = round(entry["capacity"] / seed_cap, 2) if seed_cap else None
        results["configs"][name] = entry
        log(f"  -> capacity {entry['capacity']} streams"
            + (f" ({entry['ratio_to_seed']}x the seed loop)" if entry["ratio_to_seed"] else ""))
    fp32 = {k.split(":")[0]: v["capacity"] for k, v in results["configs"].items() if k.endswith(":fp32")}
    for name, entry in results["configs"].items():
        base = fp32.get(name.split(":")[0])
        entry["ratio_to_fp32"] = round(entry["capacity"] / base, 2) if base else None
    results["elapsed_s"] = round(time.time() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(args.out)
    print(report(results))
    log(f"results: {args.out} ({results['elapsed_s'] / 60:.1f} min)")
    return 0


def report(results: dict) -> str:
    seed = results.get("seed")
    lines = [f"{'config':<14}{'capacity':>9}{'x seed':>8}{'x fp32':>8}{'p50':>8}{'p95':>8}{'p99':>8}"
             f"{'TTFR p50':>10}{'RTF p50':>9}{'batch':>7}{'c0 ms':>7}{'c ms':>7}"]
    if seed:
        lines.append(f"{'seed loop':<14}{seed['capacity']:>9}{'1.0':>8}{'':>8}"
                     + "".join(f"{_get(seed, 'trials', q):>8}" for q in ("p50", "p95", "p99")))
    for name, e in results["configs"].items():
        at = e.get("at_capacity") or {}
        lat = at.get("chunk_latency_ms") or {}
        ttfr = (at.get("time_to_first_result_ms") or {}).get("p50")
        rtf = (at.get("stream_rtf") or {}).get("p50")
        batch = (at.get("batch_size") or {}).get("mean")
        cells = [f"{e['capacity']:>9}", f"{e['ratio_to_seed'] or '-':>8}", f"{e['ratio_to_fp32'] or '-':>8}"]
        cells += [f"{lat.get(q) or 0:>8.1f}" for q in ("p50", "p95", "p99")]
        cells += [f"{ttfr or 0:>10.0f}", f"{rtf or 0:>9.3f}", f"{batch or 0:>7.1f}",
                  f"{e['step_cost']['c0_ms']:>7.1f}", f"{e['step_cost']['c_ms']:>7.2f}"]
        lines.append(f"{name:<14}" + "".join(cells))
    lines.append("latencies in ms at capacity (server-side chunk latency; p99 <= 160 ms defines capacity)")
    return "\n".join(lines)


def _get(seed: dict, key: str, q: str) -> str:
    at = next((t for t in seed[key] if t["streams"] == seed["capacity"]), None)
    value = at and at["chunk_latency_ms"][q]
    return f"{value:.1f}" if value is not None else "-"


if __name__ == "__main__":
    sys.exit(main())
