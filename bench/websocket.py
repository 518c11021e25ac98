"""What the WebSocket port adds over gRPC: client chunk latency and server CPU per stream.

One server (``asr-server --model random-base --ws-port P``, spawned as a child process; ``--model``
picks another) and, in
turn, N real-time-paced streams of real speech (``bench/audio``) over each protocol: asr.v1 on
the gRPC port, OpenAI Realtime (``/v1/realtime``) and Deepgram live (``/v1/listen``) on the
WebSocket port, all driven by the load tester (``client.loadtest.run_load`` with ``protocol``).
The protocols take turns round by round (grpc, ws-openai, ws-deepgram, grpc, ...) so that a
change in the machine's load spreads over all three.

Measured per protocol: the client-side chunk latency (from sending the last byte a result
needed, look-ahead included, to the result's arrival: the same measure for all three) p50 / p99
over every result of every round, and the server process's CPU time per stream (percent of one
core). The WebSocket figures are reported as differences from gRPC's (added latency, ms) and
ratios (CPU). OpenAI's deltas come only when the text grows, so its latencies are those chunks'.

    .venv/bin/python -m bench.websocket                        # 8 streams, 3 rounds of 15 s
    .venv/bin/python -m bench.websocket --model random-small --duration 10

Results go to ``bench/results/websocket.json``; BENCHMARKS.md ("WebSocket path") summarises them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.capacity import AUDIO, RESULTS, cpu_description  # noqa: E402
from client.loadtest import load_audio, run_load  # noqa: E402
from client.spawn import spawned_server  # noqa: E402
from client.stream import StreamOptions  # noqa: E402

PROTOCOLS = ("grpc", "ws-openai", "ws-deepgram")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


async def measure(args, log) -> dict:
    audio = load_audio(AUDIO)
    ws_port = free_port()
    server_args = ["--model", args.model, "--ws-port", str(ws_port), "--latency-budget-ms", "0",
                   "--max-batch", "64"]
    rounds: list[dict] = []
    latencies: dict[str, list[float]] = {p: [] for p in PROTOCOLS}
    with spawned_server(*server_args) as (address, proc):
        targets = {"grpc": address, "ws-openai": f"127.0.0.1:{ws_port}", "ws-deepgram": f"127.0.0.1:{ws_port}"}
        # warm up every path once (first connections, the engine's first batches)
        for protocol in PROTOCOLS:
            await run_load(targets[protocol], audio, 2, 2.0, 0.5, StreamOptions(realtime=True, interim_results=True),
                           progress=False, protocol=protocol)
        for r in range(args.rounds):
            for protocol in PROTOCOLS:
                result = await run_load(targets[protocol], audio, args.streams, args.duration, args.ramp_up,
                                        StreamOptions(realtime=True, interim_results=True), proc.pid,
                                        progress=False, seed=r, protocol=protocol)
                summary = result.summary()
                values = [rec.client_latency_ms[i] for rec in result.records for i in result.window(rec)]
                latencies[protocol] += values
                entry = {"round": r, "protocol": protocol, "streams": args.streams,
                         "chunk_latency_ms": {"p50": _pct(values, 50), "p99": _pct(values, 99), "count": len(values)},
                         "server_cpu_percent": summary["server_cpu_percent"],
                         "server_cpu_percent_per_stream": round(summary["server_cpu_percent"] / args.streams, 2),
                         "tester_cpu_percent": summary["tester_cpu_percent"], "errors": summary["errors"],
                         "streams_completed": summary["streams_completed"]}
                rounds.append(entry)
                log(f"round {r + 1}/{args.rounds} {protocol:<12} p50 {entry['chunk_latency_ms']['p50']} ms, "
                    f"p99 {entry['chunk_latency_ms']['p99']} ms ({len(values)} results), server CPU "
                    f"{entry['server_cpu_percent_per_stream']} % per stream, errors {summary['errors'] or 0}")
    out: dict = {"server_args": server_args, "trials": rounds, "protocols": {}}
    for protocol in PROTOCOLS:
        mine = [e for e in rounds if e["protocol"] == protocol]
        cpu = [e["server_cpu_percent_per_stream"] for e in mine]
        out["protocols"][protocol] = {
            "chunk_latency_ms": {"p50": _pct(latencies[protocol], 50), "p99": _pct(latencies[protocol], 99),
                                 "count": len(latencies[protocol])},
            "round_p50_ms": [e["chunk_latency_ms"]["p50"] for e in mine],
            "server_cpu_percent_per_stream": round(float(np.mean(cpu)), 2),
            "round_cpu_percent_per_stream": cpu,
            "errors": sum(sum(e["errors"].values()) for e in mine)}
    base = out["protocols"]["grpc"]
    for protocol in PROTOCOLS[1:]:
        p = out["protocols"][protocol]
        p["added_p50_ms"] = round(p["chunk_latency_ms"]["p50"] - base["chunk_latency_ms"]["p50"], 2)
        p["added_p99_ms"] = round(p["chunk_latency_ms"]["p99"] - base["chunk_latency_ms"]["p99"], 2)
        # per round: the same round's gRPC figure (the machine's load at about the same time)
        p["round_added_p50_ms"] = [round(a - b, 2) for a, b in zip(p["round_p50_ms"], base["round_p50_ms"])]
        # robust to a busy neighbour: the median over rounds of each round's difference
        p["median_round_added_p50_ms"] = round(float(np.median(p["round_added_p50_ms"])), 2)
        p["median_round_cpu_ratio"] = round(float(np.median(
            [a / b for a, b in zip(p["round_cpu_percent_per_stream"], base["round_cpu_percent_per_stream"])])), 3)
        p["cpu_ratio_to_grpc"] = round(p["server_cpu_percent_per_stream"] / base["server_cpu_percent_per_stream"], 3)
    return out


def report(results: dict) -> str:
    lines = [f"{'protocol':<13}{'p50 ms':>8}{'p99 ms':>9}{'+p50 ms':>9}{'+p99 ms':>9}{'+p50 med':>10}"
             f"{'CPU %/stream':>14}{'x gRPC':>8}{'x med':>7}{'results':>9}"]
    for name, p in results["protocols"].items():
        lat = p["chunk_latency_ms"]
        lines.append(f"{name:<13}{lat['p50']:>8.1f}{lat['p99']:>9.1f}{p.get('added_p50_ms', 0):>9.1f}"
                     f"{p.get('added_p99_ms', 0):>9.1f}{p.get('median_round_added_p50_ms', 0):>10.1f}"
                     f"{p['server_cpu_percent_per_stream']:>14.2f}{p.get('cpu_ratio_to_grpc', 1.0):>8.2f}"
                     f"{p.get('median_round_cpu_ratio', 1.0):>7.2f}{lat['count']:>9}")
    lines.append(f"{results['model']}, {results['streams']} streams, {results['rounds']} rounds of "
                 f"{results['duration_s']:g} s per protocol; client-side chunk latency over all rounds; + is over "
                 f"gRPC; med: the median over rounds of each round's difference (ratio)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.websocket", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=8, help="concurrent streams per protocol (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every protocol once (default: %(default)s)")
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds per protocol and round")
    p.add_argument("--ramp-up", type=float, default=2.0, help="seconds over which a trial's streams start")
    p.add_argument("--model", default="random-base",
                   help="the server's --model: random-base (the real compute cost) or random-small (a tiny "
                        "model: the protocols' own cost stands out; for a machine too busy for random-base)")
    p.add_argument("--out", type=Path, default=RESULTS / "websocket.json")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    started = time.time()
    machine = cpu_description()
    log(f"machine: {machine['cpu']}, {machine['cores']} cores, {' '.join(machine['isa'])}")
    results = {"machine": machine, "model": args.model, "streams": args.streams, "rounds": args.rounds, "duration_s": args.duration,
               "ramp_up_s": args.ramp_up, **asyncio.run(measure(args, log))}
    results["elapsed_s"] = round(time.time() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))
    log(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
