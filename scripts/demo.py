"""`make demo`: start asr-server on the embedded model, stream a bundled sample, stop.

Prints the interim and final transcripts as they arrive (real-time pace), then the
sample's reference transcript for comparison. Exits with the client's status.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from client.spawn import BIN, spawned_server  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=os.environ.get("ASR_MODEL", "demo"))
    p.add_argument("--sample", type=Path, default=None, help="WAV to stream (default: the first bundled sample)")
    args = p.parse_args()
    sample = (args.sample or sorted((ROOT / "samples").glob("*.wav"))[0]).resolve()
    print(f"starting asr-server --model {args.model} ...", flush=True)
    with spawned_server("--model", args.model) as (address, _):
        print(f"server ready on {address}; streaming {sample.relative_to(ROOT)} in real time:\n", flush=True)
        rc = subprocess.call([str(BIN / "asr-client"), str(sample), "--server", address, "--timing"], cwd=ROOT)
    reference = sample.with_suffix(".txt")
    if reference.exists():
        print(f"\nreference: {reference.read_text().strip()}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
