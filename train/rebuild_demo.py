"""Rebuild the shipped demo model (``models/demo``) from nothing: ``make rebuild-demo``.

The shipped weights are the end of a chain of ten training stages, each starting
from the previous stage's export: a training run from random weights on the base
corpus, then nine fine-tunings on a corpus that grows by synthesizers and voices
(``train/make_data.py`` with the flags of each stage), some exported as the mean of
the last three checkpoints and two averaged with the stage before
(``train/average_models.py``). ``train_summary.json`` records the chain
(``fine_tuned_from``, ``averaged_with``). This script runs every stage in order:

    python train/rebuild_demo.py                 # data in data/demo, model in data/rebuild/model
    python train/rebuild_demo.py --dry-run       # print the commands only
    python train/rebuild_demo.py --out models/demo

Each stage's export goes to ``WORK/stage-NN``; a stage whose export exists is skipped, and
an interrupted training run resumes from its checkpoints, so running the script again
continues where it stopped. Training is bounded by time (``--minutes``, the learning-rate
schedule follows the clock), so a rebuild on another machine sees more or fewer steps and
gives a model of the same recipe, not the same bits: 995 minutes of training in all, plus
the data synthesis. It needs the data recipe's Debian packages (``make demo-data`` installs them).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The corpus of each stage: make_data.py's flags. Sources not named are set to 0 so that
# a stage's corpus stays what it was when the stage trained, whatever the defaults.
NO_EXTRAS = ["--random-voices", "0", "--pico", "0", "--festival-prosody", "0"]
NO_NEWER = ["--random-accents", "0", "--rhvoice", "0", "--kokoro", "0", "--foreign-diphones", "0",
            "--mbrola", "0", "--british-diphones", "0", "--warped-voices", "0"]
BASE = NO_EXTRAS + NO_NEWER                                          # 30 000 training utterances
RANDOM_VOICES = ["--pico", "0", "--festival-prosody", "0"] + NO_NEWER  # 38 000
FULL_BASE = NO_NEWER                                                  # 46 000
SUBSAMPLED = ["--subsample-base", "4", "--kokoro", "300"]            # a quarter of the base, new sources
ACCENTS = SUBSAMPLED + ["--mbrola", "0", "--british-diphones", "0"]  # 28 800
MBROLA = SUBSAMPLED + ["--mbrola", "3000", "--british-diphones", "0"]  # 31 800
BRITISH = SUBSAMPLED + ["--mbrola", "3000", "--british-diphones", "3000"]  # 34 800
WARPED_3000 = SUBSAMPLED + ["--mbrola", "3000", "--british-diphones", "6000",
                            "--warped-voices", "3000", "--warped-synthesizers", "flite"]  # 39 170
WARPED_6000 = SUBSAMPLED + ["--mbrola", "3000", "--british-diphones", "6000",
                            "--warped-voices", "6000", "--warped-synthesizers", "flite"]  # 40 529

FINE_TUNE = ["--warmup", "100", "--clean-minutes", "0", "--checkpoint-minutes", "10", "--keep-checkpoints", "3"]


@dataclass(frozen=True)
class Stage:
    """One training stage: its corpus, its training runs (one per ``--minutes`` budget, the later
    ones resuming the earlier), how it is exported, and whether the export is then averaged with
    the previous stage's model."""

    data: list[str]
    runs: list[list[str]]
    export: str                       # "last" or "average" (mean of the newest three checkpoints)
    average_with_previous: bool = False
    from_scratch: bool = False
    flags: list[str] = field(default_factory=list)  # train_demo.py flags of every run


STAGES = [
    # random weights, base corpus, without the timbre augmentation: 55 minutes, resumed to 110
    Stage(BASE, [["--minutes", "55"], ["--minutes", "110"]], "last", from_scratch=True, flags=["--no-timbre"]),
    # + 8 000 utterances by random espeak-ng voices; the timbre augmentation from here on
    Stage(RANDOM_VOICES, [["--minutes", "70"], ["--minutes", "100"]], "last",
          flags=["--lr", "5e-4", "--warmup", "150", "--clean-minutes", "0"]),
    # + SVOX Pico and festival pitch: the whole base corpus
    Stage(FULL_BASE, [["--minutes", "115"]], "average",
          flags=["--lr", "4e-4", "--warmup", "100", "--clean-minutes", "0", "--checkpoint-minutes", "10"]),
    # a quarter of the base + random accents, RHVoice, Italian and Spanish diphones, Kokoro
    Stage(ACCENTS, [["--minutes", "65"]], "average", flags=["--lr", "4e-4"] + FINE_TUNE),
    # + MBROLA en1
    Stage(MBROLA, [["--minutes", "110"]], "average", flags=["--lr", "3e-4"] + FINE_TUNE),
    # + festival rab and don (British diphones)
    Stage(BRITISH, [["--minutes", "105"]], "last", flags=["--lr", "3e-4"] + FINE_TUNE),
    # + 3 000 more rab / don, warped flite voices; mean with the previous model
    Stage(WARPED_3000, [["--minutes", "100"]], "last", average_with_previous=True,
          flags=["--lr", "3e-4"] + FINE_TUNE),
    # + more warped flite voices
    Stage(WARPED_6000, [["--minutes", "75"]], "average", flags=["--lr", "3e-4", "--seed", "13"] + FINE_TUNE),
    # the same corpus; mean with the previous model
    Stage(WARPED_6000, [["--minutes", "100"]], "average", average_with_previous=True,
          flags=["--lr", "3e-4", "--seed", "14"] + FINE_TUNE),
    # the same corpus: the shipped model
    Stage(WARPED_6000, [["--minutes", "115"]], "average", flags=["--lr", "3e-4", "--seed", "16"] + FINE_TUNE),
]


def commands(data: Path, work: Path, python: str = sys.executable) -> list[tuple[Path, list[list[str]]]]:
    """Per stage: its export directory and the commands that make it, in order."""
    def script(name: str) -> str:
        return os.path.relpath(ROOT / "train" / name)

    make_data = [python, script("make_data.py"), "--out", str(data)]
    train = [python, script("train_demo.py"), "--data", str(data)]
    average = [python, script("average_models.py")]
    plan, previous, previous_data = [], None, None
    for number, stage in enumerate(STAGES, 1):
        export = work / f"stage-{number:02d}"
        work_dir = work / f"train-{number:02d}"
        init = [] if stage.from_scratch else ["--init", str(previous)]
        cmds = [] if stage.data == previous_data else [make_data + stage.data]
        cmds += [train + ["--work-dir", str(work_dir)] + init + stage.flags + run for run in stage.runs]
        target = work / f"stage-{number:02d}-alone" if stage.average_with_previous else export
        cmds.append(train + ["--work-dir", str(work_dir), "--export", str(target),
                             "--export-checkpoint", stage.export] + init)
        if stage.average_with_previous:
            cmds.append(average + [str(previous), str(target), "--out", str(export)])
        plan.append((export, cmds))
        previous, previous_data = export, stage.data
    return plan


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("data/demo"), help="corpus directory (make_data.py --out)")
    p.add_argument("--work", type=Path, default=Path("data/rebuild"), help="checkpoints and each stage's export")
    p.add_argument("--out", type=Path, default=None, help="copy the last stage's model here (e.g. models/demo)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)

    plan = commands(args.data, args.work)
    for number, (export, cmds) in enumerate(plan, 1):
        done = (export / "model.pt").is_file()
        print(f"# stage {number} of {len(plan)} -> {export}{' (done, skipped)' if done and not args.dry_run else ''}",
              flush=True)
        for cmd in cmds:
            print(shlex.join(cmd), flush=True)
            if not args.dry_run and not done:
                subprocess.run(cmd, check=True)
    if args.out is not None:
        print(f"# copy {plan[-1][0]} -> {args.out}", flush=True)
        if not args.dry_run:
            shutil.copytree(plan[-1][0], args.out, dirs_exist_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
