"""`make demo`: start asr-server on the embedded model, stream a bundled sample, stop.

Prints the interim and final transcripts as they arrive (real-time pace), then the
sample's reference transcript for comparison. Exits 0 when the final transcript
arrived, non-zero otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=os.environ.get("ASR_MODEL", "demo"))
    p.add_argument("--sample", type=Path, default=None, help="WAV to stream (default: the first bundled sample)")
    args = p.parse_args()
    sample = args.sample or sorted((ROOT / "samples").glob("*.wav"))[0]
    env = dict(os.environ, ASR_LOG_LEVEL="warning")
    server = subprocess.Popen([str(BIN / "asr-server"), "--host", "127.0.0.1", "--port", "0", "--model", args.model],
                              stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        port = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = server.stdout.readline()
            if not line:
                break
            match = re.search(r"listening on .*:(\d+)", line)
            if match:
                port = int(match.group(1))
                break
        if port is None:
            print("demo: the server did not start", file=sys.stderr)
            return 1
        print(f"server ready on port {port} (model {args.model}); streaming {sample.relative_to(ROOT)} "
              "in real time:\n", flush=True)
        rc = subprocess.call([str(BIN / "asr-client"), str(sample), "--server", f"127.0.0.1:{port}", "--timing"],
                             cwd=ROOT)
        reference = sample.with_suffix(".txt")
        if reference.exists():
            print(f"\nreference: {reference.read_text().strip()}")
        return rc
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
