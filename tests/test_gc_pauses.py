"""Python's garbage collector off the latency path: ``asr-server`` freezes its start-up heap,
so full collections walk only what was created since (``server.observability.gc_pauses``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def test_freezing_the_start_up_heap_leaves_collections_only_the_new_objects():
    # In a child process: freezing is process-wide, and the test process must stay as it is.
    script = textwrap.dedent("""
        import gc, json
        from server.model.loading import load_model
        from server.observability.gc_pauses import freeze_startup_heap
        model = load_model("random-small", 0)
        gc.collect()
        tracked = len(gc.get_objects())
        frozen = freeze_startup_heap()
        after = len(gc.get_objects())
        fresh = [[i] for i in range(1000)]  # objects created after the freeze are collectable
        print(json.dumps({"tracked": tracked, "frozen": frozen, "after": after,
                          "fresh": len(gc.get_objects()) - after}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts["tracked"] > 50_000  # torch, gRPC, the model: what a full collection walked
    assert counts["frozen"] >= counts["tracked"] * 0.9
    assert counts["after"] < counts["tracked"] / 50
    assert counts["fresh"] >= 1000


def _server_log_until_listening(*args: str) -> str:
    env = {**os.environ, "ASR_LOG_LEVEL": "info"}
    proc = subprocess.Popen([str(BIN / "asr-server"), "--model", "random-small", "--host", "127.0.0.1",
                             "--port", "0", "--metrics-port", "-1", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line or "listening on" in line:
                break
        assert proc.poll() is None, proc.stderr.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return err


def test_asr_server_freezes_its_start_up_heap_unless_told_not_to():
    log = _server_log_until_listening()
    frozen = [line for line in log.splitlines() if "start-up objects frozen" in line]
    assert frozen, log
    assert int(frozen[0].split("garbage collector: ")[1].split()[0]) > 50_000
    assert "start-up objects frozen" not in _server_log_until_listening("--no-gc-freeze")
