"""Choose the bundled demo samples (``samples/``) from the held-out test split.

One WAV per held-out voice group (espeak-ng's held-out accent ``en-029``,
espeak-ng's held-out variants on a training accent, flite ``rms``, festival
``ked_diphone``), each 3.3 to 6 s long, written as 16 kHz 16-bit WAV with its
reference transcript beside it.

Samples are demonstrations, not an accuracy measurement: with ``--greedy-json``
and ``--beam-json`` (``asr-eval ... --json`` on the same manifest) only
utterances that both decoding modes transcribe exactly are eligible, so that
``make demo`` shows what the model does when it works. The model's accuracy is
the WER over the whole held-out split (models/demo/README.md), errors included.

    python train/pick_samples.py --greedy-json greedy.json --beam-json beam4.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import soundfile

GROUPS = [  # (label in the file name, predicate on the manifest's "voice")
    ("espeak-ng", lambda v: v.startswith("espeak-ng:en-029+")),
    ("espeak-ng", lambda v: v.startswith("espeak-ng:") and not v.startswith("espeak-ng:en-029+")),
    ("flite", lambda v: v == "flite:rms"),
    ("festival", lambda v: v == "festival:ked_diphone"),
]


def _exact(path: Path | None) -> set[str] | None:
    """Audio paths (as asr-eval reports them) whose hypothesis equals the reference."""
    if path is None:
        return None
    rows = json.loads(path.read_text())["per_utterance"]
    return {Path(r["audio"]).name for r in rows if r["hypothesis"] == r["reference"]}


def choose(rows: list[dict], eligible: set[str] | None, min_s: float, max_s: float) -> list[tuple[str, dict]]:
    """The first row of each voice group (manifest order) within the duration bounds and eligible."""
    picked = []
    for label, in_group in GROUPS:
        for row in rows:
            ok = eligible is None or Path(row["audio"]).name in eligible
            if in_group(row["voice"]) and min_s <= row["duration"] <= max_s and ok and row not in (r for _, r in picked):
                picked.append((label, row))
                break
        else:
            raise SystemExit(f"no eligible utterance for the {label} group")
    return picked


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("data/demo"))
    p.add_argument("--out", type=Path, default=Path("samples"))
    p.add_argument("--greedy-json", type=Path, help="asr-eval --json output, greedy, on the test split")
    p.add_argument("--beam-json", type=Path, help="asr-eval --json output, beam search, on the test split")
    p.add_argument("--min-seconds", type=float, default=3.3)
    p.add_argument("--max-seconds", type=float, default=6.0)
    args = p.parse_args(argv)
    rows = [json.loads(line) for line in open(args.data / "test.jsonl")]
    greedy, beam = _exact(args.greedy_json), _exact(args.beam_json)
    eligible = greedy & beam if greedy is not None and beam is not None else greedy or beam
    args.out.mkdir(parents=True, exist_ok=True)
    for old in list(args.out.glob("[0-9][0-9]-*.wav")) + list(args.out.glob("[0-9][0-9]-*.txt")):
        old.unlink()
    for i, (label, row) in enumerate(choose(rows, eligible, args.min_seconds, args.max_seconds), 1):
        stem = f"{i:02d}-{label}-" + "-".join(row["text"].replace("'", "").split()[:3])
        audio, rate = soundfile.read(args.data / row["audio"], dtype="int16")
        soundfile.write(args.out / f"{stem}.wav", audio, rate, subtype="PCM_16")
        (args.out / f"{stem}.txt").write_text(row["text"] + "\n")
        print(f"{stem}.wav  {row['voice']:<32} {row['duration']:.2f} s  {row['text']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
