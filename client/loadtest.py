"""``asr-loadtest``: N concurrent real-time streams against a server; latency, RTF, capacity.

Each of the N streams sends WAV files back to back (one gRPC stream per file),
paced in real time in 160 ms messages, with interim results on, for
``--duration`` seconds after a ``--ramp-up``. Measured per result:

* client chunk latency: from sending the last byte a result needed (the chunk's
  look-ahead included) to the result's arrival, next to the server's own
  ``chunk_latency_ms`` so network and queueing show separately;
* time to first result (from the first audio byte sent), final-result latency
  (from the last audio byte sent to the final result), per-stream RTF (the
  stream's share of the batched compute / its audio), batch sizes, errors.

``--find-capacity`` searches for the largest N whose p99 client chunk latency stays
under ``--threshold-ms`` (default one chunk period, 160 ms). The tester's own CPU
use is reported, since it usually shares the machine with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import grpc
import numpy as np
import psutil
from tqdm import tqdm

from asr.v1 import asr_pb2, asr_pb2_grpc
from client.cli import read_wav
from client.spawn import spawned_server
from client.stream import SendLog, StreamOptions, channel, stream_audio

CHUNK_PERIOD_MS = 160.0
DEFAULT_AUDIO = Path(__file__).resolve().parent.parent / "samples"


@dataclass
class StreamRecord:
    """One gRPC stream (one file) of one simulated user."""

    user: int
    file: str
    audio_seconds: float
    started_at: float
    client_latency_ms: list[float] = field(default_factory=list)
    server_latency_ms: list[float] = field(default_factory=list)
    latency_at: list[float] = field(default_factory=list)  # when each latency was observed (s from test start)
    batch_sizes: list[int] = field(default_factory=list)
    compute_share_ms: float = 0.0
    first_result_ms: float | None = None
    final_latency_ms: float | None = None
    status: str = "OK"
    completed: bool = False

    @property
    def rtf(self) -> float:
        return self.compute_share_ms / 1000 / self.audio_seconds if self.audio_seconds else 0.0


@dataclass
class LoadResult:
    streams: int
    duration_s: float
    records: list[StreamRecord]
    wall_s: float
    tester_cpu_percent: float
    server_cpu_percent: float | None

    def summary(self) -> dict:
        return summarize(self)


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(result: LoadResult) -> dict:
    recs = result.records
    client = [v for r in recs for v in r.client_latency_ms]
    server = [v for r in recs for v in r.server_latency_ms]
    first = [r.first_result_ms for r in recs if r.first_result_ms is not None]
    final = [r.final_latency_ms for r in recs if r.final_latency_ms is not None]
    rtf = [r.rtf for r in recs if r.completed]
    sizes = [b for r in recs for b in r.batch_sizes]
    errors: dict[str, int] = {}
    for r in recs:
        if r.status != "OK":
            errors[r.status] = errors.get(r.status, 0) + 1

    def dist(values):
        return {"p50": _pct(values, 50), "p95": _pct(values, 95), "p99": _pct(values, 99),
                "max": max(values) if values else None, "count": len(values)}

    return {
        "streams": result.streams, "duration_s": result.duration_s, "wall_s": round(result.wall_s, 2),
        "chunk_latency_ms": dist(client), "server_chunk_latency_ms": dist(server),
        "time_to_first_result_ms": dist(first), "final_result_latency_ms": dist(final),
        "stream_rtf": dist(rtf),
        "batch_size": {"mean": float(np.mean(sizes)) if sizes else None,
                       "histogram": {str(k): int(v) for k, v in zip(*np.unique(sizes, return_counts=True))}
                       if sizes else {}},
        "streams_completed": sum(r.completed for r in recs), "errors": errors,
        "audio_seconds": round(sum(r.audio_seconds for r in recs if r.completed), 1),
        "tester_cpu_percent": round(result.tester_cpu_percent, 1),
        "server_cpu_percent": None if result.server_cpu_percent is None else round(result.server_cpu_percent, 1),
    }


def load_audio(directory: Path) -> list[tuple[str, bytes, int, int]]:
    files = sorted(directory.glob("*.wav"))
    if not files:
        raise SystemExit(f"asr-loadtest: no WAV files in {directory}")
    return [(f.name, *read_wav(f)) for f in files]


async def _one_stream(stub, user: int, audio, options: StreamOptions, t0: float) -> StreamRecord:
    name, pcm, rate, channels = audio
    seconds = len(pcm) / (2 * channels * rate)
    record = StreamRecord(user, name, seconds, time.monotonic() - t0)
    log = SendLog()
    try:
        async for event in stream_audio(stub, pcm, rate, options, channels=channels, send_log=log):
            for result in event.response.results:
                if record.first_result_ms is None and log.sent_at:
                    record.first_result_ms = (event.received_at - log.sent_at[0]) * 1000
                timing = result.timing
                record.server_latency_ms.append(timing.chunk_latency_ms)
                record.batch_sizes.append(timing.batch_size)
                record.compute_share_ms += timing.compute_ms / max(1, timing.batch_size)
                if event.client_latency_s is not None:
                    record.client_latency_ms.append(event.client_latency_s * 1000)
                    record.latency_at.append(event.received_at - t0)
                if result.is_final and log.finished_at is not None:
                    record.final_latency_ms = (event.received_at - log.finished_at) * 1000
        record.completed = True
    except grpc.aio.AioRpcError as exc:
        record.status = exc.code().name
    return record


async def run_load(address: str, audio: list, streams: int, duration: float, ramp_up: float = 2.0,
                   options: StreamOptions | None = None, server_pid: int | None = None,
                   progress: bool = True, seed: int = 0) -> LoadResult:
    """Run ``streams`` simulated users for ``duration`` seconds (after ramp-up); all records."""
    options = options or StreamOptions(realtime=True, interim_results=True)
    rng = random.Random(seed)
    me = psutil.Process()
    server = psutil.Process(server_pid) if server_pid else None
    cpu0, scpu0 = me.cpu_times(), server.cpu_times() if server else None
    records: list[StreamRecord] = []
    t0 = time.monotonic()
    end = t0 + ramp_up + duration
    async with channel(address, options=[("grpc.max_receive_message_length", 16 << 20)]) as ch:
        stub = asr_pb2_grpc.SpeechRecognitionStub(ch)

        async def user(i: int) -> None:
            await asyncio.sleep(ramp_up * i / max(1, streams) + rng.random() * 0.16)
            k = rng.randrange(len(audio))
            while time.monotonic() < end:
                records.append(await _one_stream(stub, i, audio[k % len(audio)], options, t0))
                k += 1

        async def ticker(bar):
            while time.monotonic() < end:
                await asyncio.sleep(0.5)
                bar.n = min(int(time.monotonic() - t0), bar.total)
                bar.refresh()

        with tqdm(total=int(ramp_up + duration), unit="s", desc=f"{streams} streams", disable=not progress,
                  file=sys.stderr, leave=False) as bar:
            tick = asyncio.create_task(ticker(bar))
            await asyncio.gather(*(user(i) for i in range(streams)))
            tick.cancel()
    wall = time.monotonic() - t0
    cpu1 = me.cpu_times()
    tester_cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / wall * 100
    server_cpu = None
    if server:
        s1 = server.cpu_times()
        server_cpu = (s1.user + s1.system - scpu0.user - scpu0.system) / wall * 100
    return LoadResult(streams, duration, records, wall, tester_cpu, server_cpu)


async def find_capacity(trial: Callable[[int], Awaitable[dict]], threshold_ms: float = CHUNK_PERIOD_MS,
                        start: int = 1, max_streams: int = 256, metric: str = "p99",
                        log: Callable[[str], None] = lambda s: None) -> tuple[int, list[dict]]:
    """Largest N with ``trial(N)['chunk_latency_ms'][metric] <= threshold_ms`` and no errors.

    Doubles N until a trial fails, then bisects between the last good and first bad N.
    Returns the capacity (0 if even ``start`` fails) and every trial's summary.
    """
    trials: list[dict] = []

    async def ok(n: int) -> bool:
        s = await trial(n)
        trials.append(s)
        value = s["chunk_latency_ms"][metric]
        good = value is not None and value <= threshold_ms and not s["errors"]
        log(f"N={n:4d}: {metric} chunk latency {value if value is None else round(value, 1)} ms, "
            f"errors {s['errors'] or 0} -> {'ok' if good else 'over'}")
        return good

    good, bad = 0, None
    n = start
    while n <= max_streams:
        if await ok(n):
            good = n
            n *= 2
        else:
            bad = n
            break
    if bad is None:
        return good, trials
    while bad - good > 1:
        mid = (good + bad) // 2
        if await ok(mid):
            good = mid
        else:
            bad = mid
    return good, trials


def table(summary: dict) -> str:
    def row(name, d, unit="ms"):
        cells = [("-" if d[k] is None else f"{d[k]:.1f}") for k in ("p50", "p95", "p99", "max")]
        return f"{name:<26}" + "".join(f"{c:>10}" for c in cells) + f"  {unit}"

    lines = [f"{summary['streams']} streams, {summary['duration_s']:.0f} s (+ramp-up); "
             f"{summary['streams_completed']} files completed, {summary['audio_seconds']} s of audio",
             f"{'':<26}{'p50':>10}{'p95':>10}{'p99':>10}{'max':>10}",
             row("chunk latency (client)", summary["chunk_latency_ms"]),
             row("chunk latency (server)", summary["server_chunk_latency_ms"]),
             row("time to first result", summary["time_to_first_result_ms"]),
             row("final-result latency", summary["final_result_latency_ms"]),
             row("stream RTF", summary["stream_rtf"], "x"),
             f"batch size: mean {summary['batch_size']['mean'] and round(summary['batch_size']['mean'], 2)}, "
             f"histogram {summary['batch_size']['histogram']}",
             f"errors: {summary['errors'] or 'none'}",
             f"CPU: load tester {summary['tester_cpu_percent']}% of a core"
             + ("" if summary["server_cpu_percent"] is None else f", server {summary['server_cpu_percent']}%")]
    return "\n".join(lines)


def plot(result: LoadResult, directory: Path, sweep: list[dict] | None = None) -> list[Path]:
    """PNG charts: chunk-latency CDF, latency over time per user, RTF per stream, latency vs N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    out = []
    lat = np.sort([v for r in result.records for v in r.client_latency_ms])
    fig, ax = plt.subplots(figsize=(7, 4))
    if len(lat):
        ax.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label="client")
        srv = np.sort([v for r in result.records for v in r.server_latency_ms])
        ax.plot(srv, np.arange(1, len(srv) + 1) / len(srv), label="server")
    ax.axvline(CHUNK_PERIOD_MS, color="grey", ls="--", label="chunk period")
    ax.set(xlabel="chunk latency (ms)", ylabel="fraction of chunks", title=f"Chunk latency CDF, {result.streams} streams")
    ax.legend()
    out.append(directory / "latency_cdf.png")
    fig.savefig(out[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    users: dict[int, tuple[list, list]] = {}
    for r in result.records:
        xs, ys = users.setdefault(r.user, ([], []))
        xs += r.latency_at
        ys += r.client_latency_ms
    for u, (xs, ys) in sorted(users.items()):
        ax.plot(xs, ys, lw=0.8, alpha=0.7)
    ax.axhline(CHUNK_PERIOD_MS, color="grey", ls="--")
    ax.set(xlabel="time (s)", ylabel="chunk latency (ms)", title="Chunk latency over time, one line per stream")
    out.append(directory / "latency_over_time.png")
    fig.savefig(out[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    rtf = [r.rtf for r in result.records if r.completed]
    ax.bar(range(len(rtf)), rtf)
    ax.set(xlabel="stream", ylabel="RTF (compute share / audio)", title="Real-time factor per stream")
    out.append(directory / "rtf_per_stream.png")
    fig.savefig(out[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)

    if sweep:
        fig, ax = plt.subplots(figsize=(7, 4))
        pts = sorted((s["streams"], s["chunk_latency_ms"]) for s in sweep)
        for q in ("p50", "p95", "p99"):
            ax.plot([n for n, _ in pts], [d[q] for _, d in pts], marker="o", label=q)
        ax.axhline(CHUNK_PERIOD_MS, color="grey", ls="--", label="chunk period")
        ax.set(xlabel="concurrent streams", ylabel="chunk latency (ms)", title="Chunk latency vs streams")
        ax.legend()
        out.append(directory / "latency_vs_streams.png")
        fig.savefig(out[-1], dpi=100, bbox_inches="tight")
        plt.close(fig)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asr-loadtest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--server", default="localhost:50051", help="server HOST:PORT (default: %(default)s)")
    where.add_argument("--spawn", metavar="ARGS", help="start 'asr-server ARGS' locally for the test")
    p.add_argument("--streams", type=int, default=4, help="concurrent streams (default: %(default)s)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds after ramp-up (default: %(default)s)")
    p.add_argument("--ramp-up", type=float, default=2.0, help="seconds over which streams start (default: %(default)s)")
    p.add_argument("--audio", type=Path, default=DEFAULT_AUDIO, help="directory of WAV files (default: samples/)")
    p.add_argument("--beam", type=int, default=0, metavar="N", help="beam search with N hypotheses")
    p.add_argument("--greedy", action="store_true", help="greedy decoding")
    p.add_argument("--find-capacity", action="store_true", help="search the largest N under --threshold-ms")
    p.add_argument("--threshold-ms", type=float, default=CHUNK_PERIOD_MS, help="p99 chunk latency bound")
    p.add_argument("--max-streams", type=int, default=256, help="upper bound of the capacity search")
    p.add_argument("--server-pid", type=int, help="pid of the server, to report its CPU use")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--plot", type=Path, metavar="DIR", help="write PNG charts to DIR")
    return p


def options_from(args) -> StreamOptions:
    method = asr_pb2.DECODING_METHOD_UNSPECIFIED
    if args.greedy:
        method = asr_pb2.GREEDY
    elif args.beam:
        method = asr_pb2.BEAM_SEARCH
    return StreamOptions(realtime=True, interim_results=True, decoding_method=method, beam_width=args.beam)


async def _main(args, address: str, server_pid: int | None) -> dict:
    audio = load_audio(args.audio)
    options = options_from(args)
    progress = sys.stderr.isatty()
    if args.find_capacity:
        results: dict[int, LoadResult] = {}

        async def trial(n):
            results[n] = await run_load(address, audio, n, args.duration, args.ramp_up, options, server_pid,
                                        progress=progress)
            return results[n].summary()

        capacity, trials = await find_capacity(trial, args.threshold_ms, max_streams=args.max_streams,
                                               log=lambda s: print(s, file=sys.stderr, flush=True))
        out = {"capacity": capacity, "threshold_ms": args.threshold_ms, "trials": trials}
        if args.plot and results:
            best = results.get(capacity) or results[min(results)]
            out["plots"] = [str(p) for p in plot(best, args.plot, trials)]
        return out
    result = await run_load(address, audio, args.streams, args.duration, args.ramp_up, options, server_pid,
                            progress=progress)
    out = result.summary()
    if args.plot:
        out["plots"] = [str(p) for p in plot(result, args.plot)]
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.spawn is not None:
        with spawned_server(*shlex.split(args.spawn)) as (address, proc):
            out = asyncio.run(_main(args, address, proc.pid))
    else:
        out = asyncio.run(_main(args, args.server, args.server_pid))
    if args.json:
        print(json.dumps(out, indent=2))
    elif args.find_capacity:
        print(f"capacity: {out['capacity']} streams with p99 chunk latency <= {args.threshold_ms:g} ms")
        for s in out["trials"]:
            print(f"  N={s['streams']:4d}  p99 {s['chunk_latency_ms']['p99']} ms  errors {s['errors'] or 0}")
    else:
        print(table(out))
    if "plots" in out and not args.json:
        print("plots: " + ", ".join(out["plots"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
