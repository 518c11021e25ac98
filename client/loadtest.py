"""``asr-loadtest``: N concurrent real-time streams against a server; latency, RTF, capacity.

Each of the N streams sends WAV files back to back (one gRPC stream per file),
paced in real time in 160 ms messages, with interim results on, for
``--duration`` seconds after a ``--ramp-up``. Measured per result:

* client chunk latency: from sending the last byte a result needed (the chunk's
  look-ahead included) to the result's arrival, next to the server's own
  ``chunk_latency_ms`` and queue wait, so network and queueing show separately;
* time to first result (from sending the first audio message), final-result latency
  (from the last audio byte sent to the final result), per-stream RTF (the
  stream's share of the batched compute / its audio), batch sizes, errors.

Latency statistics cover the steady state: results that arrive between the end
of the ramp-up and the end of the duration (each stream still finishes the file
it is sending). A new stream that fails with UNAVAILABLE before its first
response (a server that drains or went away) is tried again up to ``--retries``
times, on a channel to several servers on another one; a stream that fails after
that counts as an error, and its user goes on with the next file.
``--find-capacity`` searches for the largest N whose p99 client chunk latency
stays under ``--threshold-ms`` (default one chunk period, 160 ms).
The tester's own CPU use is reported, since it usually shares the machine with
the server.

``run_load`` and ``find_capacity`` are the library interface (the capacity
benchmark imports them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shlex
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import grpc
import numpy as np
import psutil
from tqdm import tqdm

from asr.v1 import asr_pb2, asr_pb2_grpc
from client.connection import Connection, add_connection_args, parse_args
from client.cli import non_negative, positive, read_wav
from client.phrases import PhraseError, Phrases, add_phrase_args, check_with_server, phrases_from_args
from client.spawn import spawned_server
from client.stream import Retry, SendLog, StreamOptions, channel, decoding_method, stream_audio
from client.ws_stream import PROTOCOLS, WsStreamError, ws_model_name, ws_stream_audio

CHUNK_PERIOD_MS = 160.0
RETRY_PAUSE_S = 0.5
PROGRESS_LINE_S = 5.0  # without a terminal: one progress line on stderr this often
DEFAULT_AUDIO = Path(__file__).resolve().parent.parent / "samples"


@dataclass
class StreamRecord:
    """One gRPC stream (one file) of one simulated user."""

    user: int
    file: str
    audio_seconds: float
    started_at: float
    # One entry per result, in parallel:
    latency_at: list[float] = field(default_factory=list)  # when it arrived (s from the test's start)
    client_latency_ms: list[float] = field(default_factory=list)
    server_latency_ms: list[float] = field(default_factory=list)
    queue_wait_ms: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    compute_share_ms: float = 0.0
    first_result_ms: float | None = None
    final_latency_ms: float | None = None
    status: str = "OK"
    completed: bool = False
    server_timed: bool = True  # the server's timing came with each result (gRPC; not the WebSocket protocols)
    retries: int = 0  # new streams it took after UNAVAILABLE before its first response (client.stream.Retry)

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
    ramp_up_s: float = 0.0

    def summary(self) -> dict:
        return summarize(self)

    def window(self, record: StreamRecord) -> list[int]:
        """Indices of ``record``'s results inside the measured (steady-state) window."""
        lo, hi = self.ramp_up_s, self.ramp_up_s + self.duration_s
        return [i for i, t in enumerate(record.latency_at) if lo <= t <= hi]


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _dist(values: list[float]) -> dict:
    return {"p50": _pct(values, 50), "p95": _pct(values, 95), "p99": _pct(values, 99),
            "max": max(values) if values else None, "count": len(values)}


def summarize(result: LoadResult) -> dict:
    recs = result.records
    client, server, queue, sizes = [], [], [], []
    for r in recs:
        for i in result.window(r):
            client.append(r.client_latency_ms[i])
            if r.server_timed:
                server.append(r.server_latency_ms[i])
                queue.append(r.queue_wait_ms[i])
                sizes.append(r.batch_sizes[i])
    first = [r.first_result_ms for r in recs if r.first_result_ms is not None]
    final = [r.final_latency_ms for r in recs if r.final_latency_ms is not None]
    errors: dict[str, int] = {}
    for r in recs:
        if r.status != "OK":
            errors[r.status] = errors.get(r.status, 0) + 1
    per_stream = []
    for user in sorted({r.user for r in recs}):
        mine = [r for r in recs if r.user == user]
        done = [r for r in mine if r.completed]
        audio = sum(r.audio_seconds for r in done)
        lat = [r.client_latency_ms[i] for r in mine for i in result.window(r)]
        per_stream.append({"stream": user, "files_completed": len(done), "errors": len(mine) - len(done),
                           "rtf": round(sum(r.compute_share_ms for r in done) / 1000 / audio, 4)
                           if audio and all(r.server_timed for r in mine) else None,
                           "chunk_latency_p99_ms": _pct(lat, 99)})
    return {
        "streams": result.streams, "duration_s": result.duration_s, "ramp_up_s": result.ramp_up_s,
        "wall_s": round(result.wall_s, 2),
        "chunk_latency_ms": _dist(client), "server_chunk_latency_ms": _dist(server),
        "server_queue_wait_ms": _dist(queue),
        "network_ms": _dist([r.client_latency_ms[i] - r.server_latency_ms[i] for r in recs if r.server_timed
                             for i in result.window(r)]),
        "time_to_first_result_ms": _dist(first), "final_result_latency_ms": _dist(final),
        "stream_rtf": _dist([r.rtf for r in recs if r.completed and r.server_timed]),
        "batch_size": {"mean": float(np.mean(sizes)) if sizes else None,
                       "histogram": {str(k): int(v) for k, v in zip(*np.unique(sizes, return_counts=True))}
                       if sizes else {}},
        "streams_completed": sum(r.completed for r in recs), "errors": errors,
        "retries": sum(r.retries for r in recs),
        "audio_seconds": round(sum(r.audio_seconds for r in recs if r.completed), 1),
        "tester_cpu_percent": round(result.tester_cpu_percent, 1),
        "server_cpu_percent": None if result.server_cpu_percent is None else round(result.server_cpu_percent, 1),
        "per_stream": per_stream,
    }


def load_audio(directory: Path) -> list[tuple[str, bytes, int, int]]:
    files = sorted(directory.glob("*.wav"))
    if not files:
        raise SystemExit(f"asr-loadtest: no WAV files in {directory}")
    return [(f.name, *read_wav(f)) for f in files]


@dataclass
class _Live:
    """What the progress bar shows while the test runs."""

    active: int = 0
    files: int = 0
    errors: int = 0
    recent_ms: deque = field(default_factory=lambda: deque(maxlen=1000))

    def postfix(self) -> str:
        p99 = f"{np.percentile(self.recent_ms, 99):.0f} ms" if self.recent_ms else "-"
        return f"{self.active} open, {self.files} files done, {self.errors} errors, recent p99 {p99}"


async def _one_stream(stub, user: int, audio, options: StreamOptions, t0: float, live: _Live,
                      retry: Retry = Retry()) -> StreamRecord:
    name, pcm, rate, channels = audio
    seconds = len(pcm) / (2 * channels * rate)
    record = StreamRecord(user, name, seconds, time.monotonic() - t0)
    log = SendLog()
    live.active += 1

    def retried(error, attempt):
        record.retries = attempt

    try:
        async for event in stream_audio(stub, pcm, rate, options, channels=channels, send_log=log, retry=retry,
                                        on_retry=retried):
            for result in event.response.results:
                if record.first_result_ms is None and log.sent_at:
                    record.first_result_ms = (event.received_at - log.sent_at[0]) * 1000
                timing = result.timing
                record.compute_share_ms += timing.compute_ms / max(1, timing.batch_size)
                if event.client_latency_s is not None:
                    record.latency_at.append(event.received_at - t0)
                    record.client_latency_ms.append(event.client_latency_s * 1000)
                    record.server_latency_ms.append(timing.chunk_latency_ms)
                    record.queue_wait_ms.append(timing.queue_wait_ms)
                    record.batch_sizes.append(timing.batch_size)
                    live.recent_ms.append(event.client_latency_s * 1000)
                if result.is_final and log.finished_at is not None:
                    record.final_latency_ms = (event.received_at - log.finished_at) * 1000
        record.completed = True
        live.files += 1
    except grpc.aio.AioRpcError as exc:
        record.status = exc.code().name
        live.errors += 1
    finally:
        live.active -= 1
    return record


async def _one_ws_stream(connection: Connection, protocol: str, user: int, audio, options: StreamOptions,
                         t0: float, live: _Live) -> StreamRecord:
    """``_one_stream`` over the WebSocket port (``client.ws_stream``): client-side timing only."""
    name, pcm, rate, channels = audio
    record = StreamRecord(user, name, len(pcm) / (2 * channels * rate), time.monotonic() - t0, server_timed=False)
    log = SendLog()
    live.active += 1
    try:
        async for event in ws_stream_audio(connection, protocol, pcm, rate, options, channels, send_log=log):
            if record.first_result_ms is None and log.sent_at:
                record.first_result_ms = (event.received_at - log.sent_at[0]) * 1000
            if event.client_latency_s is not None:
                record.latency_at.append(event.received_at - t0)
                record.client_latency_ms.append(event.client_latency_s * 1000)
                live.recent_ms.append(event.client_latency_s * 1000)
            if event.is_final and log.finished_at is not None:
                record.final_latency_ms = (event.received_at - log.finished_at) * 1000
        record.completed = True
        live.files += 1
    except (WsStreamError, OSError, TimeoutError) as exc:
        record.status = exc.code if isinstance(exc, WsStreamError) else type(exc).__name__
        live.errors += 1
    finally:
        live.active -= 1
    return record


async def run_load(address: str | Connection, audio: list, streams: int, duration: float, ramp_up: float = 2.0,
                   options: StreamOptions | None = None, server_pid: int | None = None,
                   progress: bool = True, seed: int = 0, report_every: float = 0.0,
                   protocol: str = "grpc", retry: Retry = Retry()) -> LoadResult:
    """Run ``streams`` simulated users for ``duration`` seconds after a ``ramp_up``; all records.

    ``audio``: ``load_audio(directory)``. User i starts at ``ramp_up * i / streams`` (plus a
    random phase within one chunk) and sends files back to back, one gRPC stream each,
    until the end; the file in flight then finishes. ``server_pid``: also measure the
    server's CPU use (same machine only). ``progress``: a progress bar on stderr; else, with
    ``report_every`` seconds, one summary line on stderr that often (for logs and pipes).
    ``protocol``: ``grpc`` (asr.v1), or ``ws-openai`` / ``ws-deepgram`` with ``address`` the
    server's WebSocket port (one connection per file; no server timing in the results).
    ``retry``: when a new gRPC stream is tried again (``client.stream.Retry``).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
    options = options or StreamOptions(realtime=True, interim_results=True)
    rng = random.Random(seed)
    me = psutil.Process()
    server = psutil.Process(server_pid) if server_pid else None
    cpu0, scpu0 = me.cpu_times(), server.cpu_times() if server else None
    records: list[StreamRecord] = []
    live = _Live()
    t0 = time.monotonic()
    end = t0 + ramp_up + duration
    ws = None if protocol == "grpc" else address if isinstance(address, Connection) else Connection(address)
    async with (channel(address, options=[("grpc.max_receive_message_length", 16 << 20)]) if ws is None
                else contextlib.nullcontext()) as ch:
        stub = asr_pb2_grpc.SpeechRecognitionStub(ch) if ws is None else None

        async def user(i: int) -> None:
            await asyncio.sleep(ramp_up * i / max(1, streams) + rng.random() * CHUNK_PERIOD_MS / 1000)
            k = rng.randrange(len(audio))
            while time.monotonic() < end:
                record = (await _one_stream(stub, i, audio[k % len(audio)], options, t0, live, retry) if ws is None
                          else await _one_ws_stream(ws, protocol, i, audio[k % len(audio)], options, t0, live))
                records.append(record)
                k += 1
                if not record.completed:
                    await asyncio.sleep(RETRY_PAUSE_S)  # a refused or failed stream: no busy loop

        async def ticker(bar):
            last_line = time.monotonic()
            while True:
                await asyncio.sleep(0.5)
                bar.n = min(time.monotonic() - t0, bar.total)
                bar.set_postfix_str(live.postfix(), refresh=True)
                if not progress and report_every > 0 and time.monotonic() - last_line >= report_every:
                    last_line = time.monotonic()
                    print(f"asr-loadtest: {bar.n:.0f}/{bar.total:.0f} s, {streams} streams: {live.postfix()}",
                          file=sys.stderr, flush=True)

        with tqdm(total=ramp_up + duration, unit="s", desc=f"{streams} streams", disable=not progress,
                  file=sys.stderr, leave=False, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s{postfix}") as bar:
            tick = asyncio.create_task(ticker(bar))
            try:
                await asyncio.gather(*(user(i) for i in range(streams)))
            finally:
                tick.cancel()
    wall = time.monotonic() - t0
    cpu1 = me.cpu_times()
    tester_cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / wall * 100
    server_cpu = None
    if server:
        s1 = server.cpu_times()
        server_cpu = (s1.user + s1.system - scpu0.user - scpu0.system) / wall * 100
    return LoadResult(streams, duration, records, wall, tester_cpu, server_cpu, ramp_up)


async def find_capacity(trial: Callable[[int], Awaitable[dict]], threshold_ms: float = CHUNK_PERIOD_MS,
                        start: int = 1, max_streams: int = 256, metric: str = "p99",
                        log: Callable[[str], None] = lambda s: None,
                        repeat_within: float = 0.0) -> tuple[int, list[dict]]:
    """Largest N in [start, max_streams] with ``trial(N)['chunk_latency_ms'][metric] <= threshold_ms``
    and no errors (``trial`` returns a ``summarize`` dict, e.g. of ``run_load``).

    Doubles N from ``start`` (the last step capped at ``max_streams``) until a trial fails,
    then bisects between the last good and the first bad N; each N is tried once, or twice
    when its figure lies within ``repeat_within`` (a fraction) of the threshold: then the
    mean of the two decides (a p99 from a few hundred results is decided by its slowest few,
    so on a noisy machine one trial near the line can fall either way).
    Returns the capacity (0 if every N tried failed) and every trial's summary, in order.
    """
    trials: list[dict] = []

    async def measure(n: int) -> tuple[float | None, dict]:
        s = await trial(n)
        trials.append(s)
        return s["chunk_latency_ms"][metric], s

    async def ok(n: int) -> bool:
        value, s = await measure(n)
        near = value is not None and abs(value - threshold_ms) <= repeat_within * threshold_ms
        if repeat_within > 0 and near and not s["errors"]:
            again, s2 = await measure(n)
            log(f"N={n:4d}: {metric} chunk latency {round(value, 1)} ms, near {threshold_ms:g}: "
                f"tried again, {again if again is None else round(again, 1)} ms")
            value = None if again is None else (value + again) / 2
            s = {**s, "errors": s2["errors"]}
        good = value is not None and value <= threshold_ms and not s["errors"]
        log(f"N={n:4d}: {metric} chunk latency {value if value is None else round(value, 1)} ms, "
            f"errors {s['errors'] or 0} -> {'ok' if good else 'over'}")
        return good

    good, bad = 0, None
    n = max(1, min(start, max_streams))
    while True:
        if not await ok(n):
            bad = n
            break
        good = n
        if n >= max_streams:
            return good, trials
        n = min(n * 2, max_streams)
    while bad - good > 1:
        mid = (good + bad) // 2
        if await ok(mid):
            good = mid
        else:
            bad = mid
    return good, trials


def table(summary: dict) -> str:
    """The summary as a text table, for people."""
    def row(name, d, unit="ms", fmt="{:.1f}"):
        cells = [("-" if d[k] is None else fmt.format(d[k])) for k in ("p50", "p95", "p99", "max")]
        return f"{name:<32}" + "".join(f"{c:>10}" for c in cells) + f"  {unit}"

    batch = summary["batch_size"]
    lines = [f"{summary['streams']} streams for {summary['duration_s']:g} s after {summary['ramp_up_s']:g} s of "
             f"ramp-up ({summary['wall_s']:g} s in all); {summary['streams_completed']} files completed, "
             f"{summary['audio_seconds']} s of audio",
             f"{'':<32}{'p50':>10}{'p95':>10}{'p99':>10}{'max':>10}",
             row("chunk latency (client)", summary["chunk_latency_ms"]),
             row("  of which in the server", summary["server_chunk_latency_ms"]),
             row("    waiting in its queue", summary["server_queue_wait_ms"]),
             row("  network + gRPC (client-server)", summary["network_ms"]),
             row("time to first result", summary["time_to_first_result_ms"]),
             row("final-result latency", summary["final_result_latency_ms"]),
             row("stream RTF", summary["stream_rtf"], "x", "{:.3f}"),
             f"batch size: mean {batch['mean'] and round(batch['mean'], 2)}, histogram {batch['histogram']}",
             f"errors: {summary['errors'] or 'none'}" + (f"; {summary['retries']} retries after UNAVAILABLE"
                                                         if summary.get("retries") else ""),
             f"CPU: load tester {summary['tester_cpu_percent']}% of a core"
             + ("" if summary["server_cpu_percent"] is None else f", server {summary['server_cpu_percent']}%")]
    return "\n".join(lines)


def latency_over_time_figure(result: LoadResult):
    """Client chunk latency against time, one colour per simulated user and one line per file it
    streamed (the pause between two files is not drawn as a line), the 160 ms chunk period, the
    unmeasured ramp-up and tail, and a red cross where a stream was refused or failed."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    users = sorted({r.user for r in result.records})
    colours = plt.get_cmap("tab10")
    for n, user in enumerate(users):
        colour = colours(n % 10)
        for i, r in enumerate(rec for rec in result.records if rec.user == user and rec.latency_at):
            ax.plot(r.latency_at, r.client_latency_ms, lw=0.8, alpha=0.8, color=colour,
                    label=f"stream {user}" if i == 0 and len(users) <= 10 else None)
    if len(users) > 10:
        ax.plot([], [], color="grey", lw=0.8, label=f"{len(users)} streams, one colour each")
    failed = [r for r in result.records if r.status != "OK"]
    if failed:
        top = max([v for r in result.records for v in r.client_latency_ms] or [CHUNK_PERIOD_MS])
        codes = sorted({r.status for r in failed})
        ax.scatter([r.started_at for r in failed], [top] * len(failed), marker="x", color="red", zorder=3,
                   label=f"refused / failed stream ({', '.join(codes)}): {len(failed)}")
    ax.axhline(CHUNK_PERIOD_MS, color="grey", ls="--", label=f"{CHUNK_PERIOD_MS:g} ms (one chunk period)")
    ax.axvspan(0, result.ramp_up_s, color="grey", alpha=0.1, label="ramp-up (not measured)")
    ax.axvspan(result.ramp_up_s + result.duration_s, max(result.wall_s, result.ramp_up_s + result.duration_s),
               color="tab:orange", alpha=0.08, label="last files finishing (not measured)")
    ax.set(xlabel="time (s)", ylabel="client chunk latency (ms)", title="Chunk latency over time")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def rtf_per_stream_figure(result: LoadResult):
    """Real-time factor per simulated user: bars at whole-number stream ids, and the RTF = 1 line
    (above it a stream's compute would not keep up with its audio)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    per_stream = summarize(result)["per_stream"]
    ax.bar([s["stream"] for s in per_stream], [s["rtf"] or 0 for s in per_stream], label="stream RTF")
    ax.axhline(1.0, color="red", ls="--", label="RTF = 1 (real time)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="stream", ylabel="RTF (compute share / audio)", title="Real-time factor per stream")
    ax.legend(fontsize="small")
    return fig


def plot(result: LoadResult, directory: Path, sweep: list[dict] | None = None) -> list[Path]:
    """PNG charts: chunk-latency CDF, latency over time per stream, RTF per stream, and, given the
    summaries of a sweep over N (``find_capacity``'s trials), latency vs N. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    out = []

    def save(fig, name):
        out.append(directory / name)
        fig.savefig(out[-1], dpi=100, bbox_inches="tight")
        plt.close(fig)

    measured = [(r, result.window(r)) for r in result.records]
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, attr in (("client", "client_latency_ms"), ("server", "server_latency_ms")):
        values = np.sort([getattr(r, attr)[i] for r, idx in measured for i in idx])
        if len(values):
            ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=label)
    ax.axvline(CHUNK_PERIOD_MS, color="grey", ls="--", label="chunk period")
    ax.set(xlabel="chunk latency (ms)", ylabel="fraction of results",
           title=f"Chunk latency CDF, {result.streams} streams (after ramp-up)")
    ax.legend()
    save(fig, "latency_cdf.png")

    save(latency_over_time_figure(result), "latency_over_time.png")
    save(rtf_per_stream_figure(result), "rtf_per_stream.png")

    if sweep:
        fig, ax = plt.subplots(figsize=(7, 4))
        pts = sorted((s["streams"], s) for s in sweep)
        ns = [n for n, _ in pts]
        for q in ("p50", "p95", "p99"):
            ax.plot(ns, [s["chunk_latency_ms"][q] for _, s in pts], marker="o", label=f"client {q}")
        ax.plot(ns, [s["server_chunk_latency_ms"]["p99"] for _, s in pts], marker="x", ls=":", label="server p99")
        ax.axhline(CHUNK_PERIOD_MS, color="grey", ls="--", label="chunk period")
        ax.set(xlabel="concurrent streams", ylabel="chunk latency (ms)", title="Chunk latency vs streams")
        ax.legend()
        save(fig, "latency_vs_streams.png")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asr-loadtest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--server", default="localhost:50051", help="server HOST:PORT (default: %(default)s)")
    where.add_argument("--spawn", metavar="ARGS", help="start 'asr-server ARGS' locally for the test")
    p.add_argument("--protocol", choices=PROTOCOLS, default="grpc",
                   help="grpc (asr.v1), or the WebSocket port's OpenAI Realtime (ws-openai) or Deepgram "
                        "(ws-deepgram) protocol, --server then naming the WebSocket port; client-side "
                        "timing only for those (default: %(default)s)")
    p.add_argument("--streams", type=positive(int), default=4, help="concurrent streams (default: %(default)s)")
    p.add_argument("--duration", type=positive(float), default=20.0,
                   help="seconds measured after the ramp-up (default: %(default)s)")
    p.add_argument("--ramp-up", type=non_negative(float), default=2.0,
                   help="seconds over which the streams start (default: %(default)s)")
    p.add_argument("--audio", type=Path, default=DEFAULT_AUDIO, help="directory of WAV files (default: samples/)")
    p.add_argument("--beam", type=int, default=0, metavar="N", help="beam search with N hypotheses")
    p.add_argument("--greedy", action="store_true", help="greedy decoding")
    p.add_argument("--find-capacity", action="store_true",
                   help="search the largest N whose p99 chunk latency stays under --threshold-ms")
    p.add_argument("--threshold-ms", type=positive(float), default=CHUNK_PERIOD_MS,
                   help="p99 chunk latency bound of --find-capacity (default: one chunk period, %(default)s)")
    p.add_argument("--max-streams", type=positive(int), default=256,
                   help="upper bound of the capacity search (default: %(default)s)")
    p.add_argument("--repeat-within", type=float, default=0.15,
                   help="--find-capacity runs a trial again when its p99 lies within this fraction of "
                        "--threshold-ms, and judges by the mean of the two (0: once; default %(default)s)")
    p.add_argument("--retries", type=non_negative(int), default=Retry().attempts, metavar="N",
                   help="a new stream that fails with UNAVAILABLE before its first response (a server that drains "
                        "or went away) is tried again up to N times, on another server where --server names "
                        "several (0: never; default %(default)s)")
    p.add_argument("--server-pid", type=int, help="pid of the server, to report its CPU use (same machine)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--plot", type=Path, metavar="DIR", help="write PNG charts to DIR")
    p.add_argument("--expect-errors", action="store_true",
                   help="exit 0 even when streams end with errors (by default a run with any stream error "
                        "exits 1; a --find-capacity search expects them above capacity and exits 0 once it "
                        "has a figure)")
    add_phrase_args(p)
    add_connection_args(p)
    return p


def options_from(args) -> StreamOptions:
    """The streams' options; ``PhraseError`` if the phrase options are wrong (client.phrases)."""
    method = decoding_method(args.greedy, args.beam)
    phrases = phrases_from_args(args)
    return StreamOptions(realtime=True, interim_results=True, decoding_method=method, beam_width=args.beam,
                         phrases=phrases.phrases, boost=phrases.boost)


async def check_phrases(address: str | Connection, options: StreamOptions) -> None:
    """``SystemExit`` naming the limit if the streams' phrases exceed the server's (``GetModelInfo``)."""
    if options.phrases:
        async with channel(address) as ch:
            try:
                await check_with_server(ch, Phrases(options.phrases, options.boost))
            except PhraseError as exc:
                raise SystemExit(f"asr-loadtest: {exc}") from None


async def model_name(address: str | Connection, timeout: float = 10.0) -> str:
    """The server's model (``GetModelInfo``); ``SystemExit`` with a message if it does not answer."""
    async with channel(address) as ch:
        try:
            info = await asr_pb2_grpc.SpeechRecognitionStub(ch).GetModelInfo(asr_pb2.GetModelInfoRequest(),
                                                                              timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            where = address.address if isinstance(address, Connection) else address
            raise SystemExit(f"asr-loadtest: cannot reach the server at {where}: "
                             f"{exc.code().name}: {exc.details()}") from None
    return info.model_name


async def _main(args, address: str | Connection, server_pid: int | None) -> dict:
    audio = load_audio(args.audio)
    options = options_from(args)
    if args.protocol == "grpc":
        model = await model_name(address)
        await check_phrases(address, options)
    else:
        connection = address if isinstance(address, Connection) else Connection(address)
        try:
            model = await ws_model_name(connection, args.protocol)
        except Exception as exc:  # refused, unreachable, not this protocol
            raise SystemExit(f"asr-loadtest: cannot reach the {args.protocol} WebSocket API at "
                             f"{connection.address}: {exc}") from None
    progress = sys.stderr.isatty()
    report_every = 0.0 if progress else PROGRESS_LINE_S
    if args.find_capacity:
        results: dict[int, LoadResult] = {}

        async def trial(n):
            results[n] = await run_load(address, audio, n, args.duration, args.ramp_up, options, server_pid,
                                        progress=progress, report_every=report_every, protocol=args.protocol,
                                        retry=Retry(attempts=args.retries))
            return results[n].summary()

        capacity, trials = await find_capacity(trial, args.threshold_ms, max_streams=args.max_streams,
                                               log=lambda s: print(s, file=sys.stderr, flush=True),
                                               repeat_within=args.repeat_within)
        out = {"model": model, "capacity": capacity, "threshold_ms": args.threshold_ms, "trials": trials}
        if args.plot and results:
            best = results.get(capacity) or results[min(results)]
            out["plots"] = [str(p) for p in plot(best, args.plot, trials)]
        return out
    result = await run_load(address, audio, args.streams, args.duration, args.ramp_up, options, server_pid,
                            progress=progress, report_every=report_every, protocol=args.protocol,
                            retry=Retry(attempts=args.retries))
    out = {"model": model, "protocol": args.protocol, **result.summary()}
    if args.plot:
        out["plots"] = [str(p) for p in plot(result, args.plot)]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    if args.spawn is not None and args.protocol != "grpc":
        print("asr-loadtest: --spawn serves gRPC only; start asr-server with --ws-port and pass --server "
              "HOST:WS_PORT for --protocol " + args.protocol, file=sys.stderr)
        return 2
    try:
        phrases = options_from(args).phrases
    except PhraseError as exc:
        print(f"asr-loadtest: {exc}", file=sys.stderr)
        return 2
    if phrases and args.protocol != "grpc":
        print(f"asr-loadtest: --protocol {args.protocol} carries no phrases (the OpenAI Realtime and Deepgram "
              "sessions here have no such field); use --protocol grpc", file=sys.stderr)
        return 2
    if args.spawn is not None:
        with spawned_server(*shlex.split(args.spawn)) as (address, proc):
            out = asyncio.run(_main(args, address, proc.pid))
    else:
        out = asyncio.run(_main(args, args.connection, args.server_pid))
    if args.json:
        print(json.dumps(out, indent=2))
    elif args.find_capacity:
        print(f"capacity: {out['capacity']} streams with p99 chunk latency <= {args.threshold_ms:g} ms")
        print(f"{'N':>6}{'client p50':>12}{'client p99':>12}{'server p99':>12}  errors")
        for s in out["trials"]:
            cells = [s["chunk_latency_ms"]["p50"], s["chunk_latency_ms"]["p99"], s["server_chunk_latency_ms"]["p99"]]
            print(f"{s['streams']:>6}" + "".join("           -" if c is None else f"{c:>9.1f} ms" for c in cells)
                  + f"  {s['errors'] or 'none'}")
    else:
        print(f"model {out['model']}\n" + table(out))
    if "plots" in out and not args.json:
        print("plots: " + ", ".join(out["plots"]))
    return exit_code(out, args)


def exit_code(out: dict, args) -> int:
    """1 when streams failed and errors were not expected (or a capacity search found none), else 0."""
    if args.find_capacity:
        if out["capacity"] == 0:
            print("asr-loadtest: no number of streams met the latency threshold without errors", file=sys.stderr)
            return 1
        return 0
    errors = out.get("errors") or {}
    if errors and not args.expect_errors:
        print(f"asr-loadtest: {sum(errors.values())} stream(s) ended with errors "
              f"({', '.join(f'{code} x{n}' for code, n in sorted(errors.items()))}); exit 1 "
              "(--expect-errors to accept)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
