"""Copy a fixed, voice-stratified subset of the held-out test split into the repo.

The full corpus (``make demo-data``) is not committed; the tests and the model
card's quick WER use this subset (``tests/data/demo-heldout``): every held-out
voice is represented in proportion, chosen reproducibly from ``--seed``.

    .venv/bin/python train/heldout_subset.py --data data/demo --out tests/data/demo-heldout --count 80
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import shutil
import sys
from pathlib import Path


def choose(rows: list[dict], count: int, seed: int) -> list[dict]:
    """``count`` rows, round-robin over voices (each voice's rows shuffled with ``seed``)."""
    rng = random.Random(seed)
    by_voice: dict[str, list[dict]] = collections.defaultdict(list)
    for row in rows:
        by_voice[row["voice"]].append(row)
    for voice_rows in by_voice.values():
        rng.shuffle(voice_rows)
    # Larger voices first in each round, so the subset follows the split's voice mix.
    voices = sorted(by_voice, key=lambda v: -len(by_voice[v]))
    picked: list[dict] = []
    quota = {v: max(1, round(count * len(by_voice[v]) / len(rows))) for v in voices}
    for v in voices:
        picked += by_voice[v][:quota[v]]
    return sorted(picked[:count], key=lambda r: r["audio"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("data/demo"))
    p.add_argument("--out", type=Path, default=Path("tests/data/demo-heldout"))
    p.add_argument("--count", type=int, default=80)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows = [json.loads(line) for line in open(args.data / "test.jsonl")]
    picked = choose(rows, args.count, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "manifest.jsonl", "w") as f:
        for row in picked:
            name = Path(row["audio"]).name
            shutil.copy(args.data / row["audio"], args.out / name)
            f.write(json.dumps(dict(row, audio=name)) + "\n")
    voices = collections.Counter(r["voice"] for r in picked)
    print(f"{len(picked)} utterances, {sum(r['duration'] for r in picked):.0f} s, {len(voices)} voices -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
