"""``python -m bench.hostile``: each attack of docs/operations.md ("Hostile clients", "HTTP/2
abuse") at full scale against a real ``asr-server --model demo`` with bearer tokens, beside
``--victims`` authorised real-time streams of real speech (``client.loadtest.run_load``).

Per attack, in one run on one machine: the real-time streams' chunk latency (p50 / p99, the
server's own figure and the client's) and their refusals with no attack and during it, the
attacker's status codes, and the server's RSS before, at its peak and ``--settle`` seconds after
the attack ended. The attackers are separate processes (``tests.attacks``, ``tests.h2_flood``, a
busy loop), so their CPU and memory are not the server's, but they share this machine's cores.

    .venv/bin/python -m bench.hostile                       # every attack (about 10 min)
    .venv/bin/python -m bench.hostile --attacks unauth,big  # some

``--via direct,proxy,proxy-auth`` runs each attack once per path, in one run on one server: the
attacker and the real-time streams straight to the server (``direct``), or both through the real
HAProxy of ``deploy/haproxy/haproxy.cfg`` (``proxy``; ``proxy-auth``: with ``ASR_PROXY_TOKEN_DIGESTS``,
so that the proxy refuses token-less calls itself). The token-less callers connect from the real-time
streams' address (127.0.0.1), so for ``unauth`` the proxy's per-address rates are raised out of the
way and only the token check acts; the rapid reset comes from 127.0.0.2 under the config's defaults.

    .venv/bin/python -m bench.hostile --attacks unauth --via direct,proxy,proxy-auth

Results: ``bench/results/hostile.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import psutil

from client.connection import Connection
from client.loadtest import load_audio, run_load, summarize
from client.spawn import spawned_server

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-hostile-token-0123456789"
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
VIAS = ("direct", "proxy", "proxy-auth")
# the attacker shares the real-time streams' address: per-address rates out of the way (unauth)
NO_RATE_LIMIT = {"ASR_PROXY_MAX_STREAM_RATE_PER_IP": "10000000", "ASR_PROXY_MAX_CONN_RATE_PER_IP": "1000000"}
# name -> (what it is, the attacker's command line after ``python``; {port} and {token} filled in)
ATTACKS = {
    "unauth": ("20 token-less callers re-opening streams of 4 MB messages",
               ["-m", "tests.attacks", "unauth", "--clients", "20", "--message-bytes", "4000000"]),
    "trickle": ("204 streams each sending 2 bytes every 20 s",
                ["-m", "tests.attacks", "trickle", "--clients", "204", "--bytes", "2", "--interval", "20",
                 "--token", "{token}"]),
    "big": ("8 streams of three 4.19 MB LINEAR16 messages at 8 kHz",
            ["-m", "tests.attacks", "big", "--clients", "8", "--messages", "3", "--message-bytes", "4190000",
             "--rate", "8000", "--token", "{token}"]),
    "firehose": ("64 streams of 60 s of audio each, sent as fast as the server reads",
                 ["-m", "tests.attacks", "firehose", "--clients", "64", "--seconds", "60", "--token", "{token}"]),
    "neighbour": ("one busy-looping process beside the server", ["-c", "while True: pass"]),
    "rapid-reset": ("100 000 HEADERS + RST_STREAM pairs on one connection",
                    ["-m", "tests.h2_flood", "rapid-reset", "--pairs", "100000"]),
}


def attacker(name: str, port: int, seconds: float) -> subprocess.Popen:
    argv = [a.format(port=port, token=TOKEN) for a in ATTACKS[name][1]]
    if argv[0] == "-m":
        argv += ["--port", str(port)]
        if name in ("unauth", "trickle"):
            argv += ["--seconds", str(seconds)]
        if name == "rapid-reset":
            argv += ["--source", "127.0.0.2"]  # its own address (a proxy limits per address)
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def rss_mb(process: psutil.Process) -> float:
    return process.memory_info().rss / 2**20


async def victims(address: str, audio, streams: int, seconds: float, server_pid: int) -> dict:
    result = await run_load(Connection(address, token=TOKEN), audio, streams, seconds, ramp_up=1.0,
                            server_pid=server_pid, progress=False)
    s = summarize(result)
    return {"server_p50_ms": s["server_chunk_latency_ms"].get("p50"),
            "server_p99_ms": s["server_chunk_latency_ms"].get("p99"),
            "client_p99_ms": s["chunk_latency_ms"].get("p99"), "errors": s["errors"],
            "streams_completed": s["streams_completed"]}


@contextlib.contextmanager
def proxy(backend: str, tokens: Path | None, env: dict) -> Iterator[tuple[str, psutil.Process]]:
    """deploy/haproxy/haproxy.cfg on a free port in front of ``backend`` (with ``tokens``: the
    digest file of ASR_PROXY_TOKEN_DIGESTS); yields its address and process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    environment = {**os.environ, "ASR_PROXY_BIND": f"127.0.0.1:{port}", "ASR_BACKEND": backend, **env}
    if tokens is not None:
        environment["ASR_PROXY_TOKEN_DIGESTS"] = str(tokens)
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    process = subprocess.Popen([binary, "-db", "-f", str(HAPROXY_CFG)], env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"haproxy did not start (exit code {process.poll()})")
            time.sleep(0.05)
        yield f"127.0.0.1:{port}", psutil.Process(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=10)


def cpu_s(process: psutil.Process | None) -> float:
    if process is None:
        return 0.0
    times = process.cpu_times()
    return times.user + times.system


async def measure(name: str, address: str, server: psutil.Process, audio, args,
                  via_proxy: psutil.Process | None = None) -> dict:
    port = int(address.rsplit(":", 1)[1])
    quiet = await victims(address, audio, args.victims, args.seconds, server.pid)
    before = rss_mb(server)
    load_before = os.getloadavg()[0]
    process = attacker(name, port, args.seconds + 2)
    peak = before
    try:
        await asyncio.sleep(1.0)  # the attack is under way
        cpu_before = cpu_s(server), cpu_s(via_proxy)
        started = time.monotonic()
        run = asyncio.create_task(victims(address, audio, args.victims, args.seconds, server.pid))
        while not run.done():
            peak = max(peak, rss_mb(server))
            await asyncio.sleep(0.5)
        attacked = run.result()
        window = time.monotonic() - started
        cpu = {"server": round((cpu_s(server) - cpu_before[0]) / window, 3),
               "proxy": round((cpu_s(via_proxy) - cpu_before[1]) / window, 3)}
    finally:
        if name == "neighbour":  # the others end by themselves (their own --seconds, or their work done)
            process.terminate()
    try:
        out, err = await asyncio.get_running_loop().run_in_executor(None, lambda: process.communicate(timeout=180))
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    ended = time.monotonic()
    while time.monotonic() - ended < args.settle:
        peak = max(peak, rss_mb(server))
        await asyncio.sleep(1.0)
    report = out.strip().splitlines()[-1] if out.strip() else err.strip()[-300:]
    try:
        report = json.loads(report)
    except json.JSONDecodeError:
        pass
    return {"attack": name, "what": ATTACKS[name][0], "quiet": quiet, "attacked": attacked,
            "attacker": report, "cores_busy_during_attack": cpu, "load_average_1m": round(load_before, 2),
            "rss_mb": {"before": round(before, 1), "peak": round(peak, 1),
                       f"after_{args.settle:g}s": round(rss_mb(server), 1)}}


async def main(args) -> dict:
    audio = load_audio(ROOT / "bench" / "audio")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "tokens"
        tokens.write_text(TOKEN + "\n")
        digests = Path(tmp) / "tokens.sha256"
        digests.write_text(hashlib.sha256(TOKEN.encode()).hexdigest() + "\n")
        with spawned_server("--model", "demo", "--auth-token-file", str(tokens),
                            "--max-message-bytes", "4200000") as (address, proc):
            server = psutil.Process(proc.pid)
            for name in args.attacks:
                for via in args.via:
                    print(f"bench.hostile: {name} ({via}): {ATTACKS[name][0]} ...", file=sys.stderr, flush=True)
                    env = NO_RATE_LIMIT if name == "unauth" else {}
                    with contextlib.ExitStack() as stack:
                        target, haproxy = address, None
                        if via != "direct":
                            target, haproxy = stack.enter_context(
                                proxy(address, digests if via == "proxy-auth" else None, env))
                        results.append({"via": via, **await measure(name, target, server, audio, args, haproxy)})
                    r = results[-1]
                    print(f"  real-time p99 {r['quiet']['server_p99_ms']} -> {r['attacked']['server_p99_ms']} ms "
                          f"(client {r['quiet']['client_p99_ms']} -> {r['attacked']['client_p99_ms']} ms), errors "
                          f"{r['attacked']['errors']}, cores busy {r['cores_busy_during_attack']}, load "
                          f"{r['load_average_1m']}, RSS {r['rss_mb']}, attacker {str(r['attacker'])[:200]}",
                          file=sys.stderr, flush=True)
    cpu = {"cores": psutil.cpu_count(), "model": next((line.split(":", 1)[1].strip() for line in
                                                        open("/proc/cpuinfo") if line.startswith("model name")), "")}
    return {"cpu": cpu, "victims": args.victims, "seconds": args.seconds, "results": results}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.split("\n\n")[0])
    p.add_argument("--attacks", type=lambda s: s.split(","), default=list(ATTACKS),
                   help=f"comma-separated, of: {', '.join(ATTACKS)}")
    p.add_argument("--via", type=lambda s: s.split(","), default=["direct"],
                   help=f"comma-separated paths to the server, each attack once per path: {', '.join(VIAS)}")
    p.add_argument("--victims", type=int, default=4, help="authorised real-time streams beside each attack")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds of each measurement")
    p.add_argument("--settle", type=float, default=60.0, help="seconds after an attack before RSS is read")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "hostile.json")
    args = p.parse_args(argv)
    unknown = [a for a in args.attacks if a not in ATTACKS]
    if unknown:
        p.error(f"unknown attack {unknown[0]!r}; choose from {', '.join(ATTACKS)}")
    unknown = [v for v in args.via if v not in VIAS]
    if unknown:
        p.error(f"unknown path {unknown[0]!r}; choose from {', '.join(VIAS)}")
    return args


if __name__ == "__main__":
    arguments = parse()
    summary = asyncio.run(main(arguments))
    arguments.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"bench.hostile: wrote {arguments.out}", file=sys.stderr)
