"""Start ``asr-server`` as a child process for tools that need one (demo, eval, benchmarks).

Runs the installed console script, never server code in-process: the tools stay
clients of the gRPC API.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

BIN = Path(sys.executable).parent


@contextlib.contextmanager
def spawned_server(*args: str, host: str = "127.0.0.1", timeout: float = 180.0,
                   env: dict | None = None, quiet: bool = True,
                   command: Sequence[str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """Yield ``("HOST:PORT", process)`` of a fresh ``asr-server --port 0 ARGS``; SIGTERM on exit.
    ``command``: what stands for ``asr-server`` (default: the installed console script)."""
    environment = dict(os.environ, **(env or {}))
    if quiet:
        environment.setdefault("ASR_LOG_LEVEL", "warning")
    environment.setdefault("ASR_METRICS_PORT", "0")  # a throwaway server takes no fixed port
    environment.setdefault("ASR_METRICS_HOST", host)
    proc = subprocess.Popen([*(command or [str(BIN / "asr-server")]), "--host", host, "--port", "0", *args],
                            stdout=subprocess.PIPE, text=True, env=environment)
    try:
        port = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            match = re.search(r"listening on .*:(\d+)", line)
            if match:
                port = int(match.group(1))
                break
        if port is None:
            raise RuntimeError(f"asr-server {' '.join(args)} did not start (exit code {proc.poll()})")
        # keep draining stdout so the child never blocks on a full pipe
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        yield f"{host}:{port}", proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
