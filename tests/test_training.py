"""The demo model's training recipe: a few steps on a handful of utterances.

Runs ``train/train_demo.py`` on the bundled samples (real recipe, features, loss
and checkpointing; no augmentation so the loss is comparable step to step) and
checks that the loss falls, that a checkpoint resumes where it stopped, and that
export writes files the server's loader reads.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from server.models import load_demo
from tests.conftest import ROOT, SAMPLES

sys.path.insert(0, str(ROOT / "train"))
import train_demo  # noqa: E402
from sentences import generate, vocabulary  # noqa: E402


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    data = tmp_path_factory.mktemp("corpus")
    rows = []
    for wav in sorted(SAMPLES.glob("*.wav")):
        shutil.copy(wav, data / wav.name)
        rows.append({"audio": wav.name, "text": wav.with_suffix(".txt").read_text().strip()})
    for split in ("train", "dev"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def _losses(work) -> list[float]:
    return [r["loss"] for r in map(json.loads, (work / "train_log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_a_few_training_steps_lower_the_loss_resume_and_export(tiny_corpus, tmp_path, capsys):
    work = tmp_path / "work"
    common = ["--data", str(tiny_corpus), "--work-dir", str(work), "--batch-seconds", "8", "--no-augment",
              "--warmup", "5", "--lr", "3e-3", "--dev-utterances", "2", "--threads", "2"]
    assert train_demo.main(common + ["--max-steps", "24"]) == 0
    losses = _losses(work)
    assert len(losses) == 24
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.7 * first, f"loss did not fall: {first:.1f} -> {last:.1f}"
    assert (work / "last.pt").exists() and (work / "best.pt").exists()

    capsys.readouterr()
    assert train_demo.main(common + ["--max-steps", "26"]) == 0
    assert "resumed from step 24" in capsys.readouterr().out
    assert len(_losses(work)) == 26

    out = tmp_path / "model"
    assert train_demo.main(["--work-dir", str(work), "--export", str(out)]) == 0
    model = load_demo(out)
    assert model.tokens.size == 29 and model.num_parameters > 1e6


def test_sentence_generator_is_reproducible_and_covers_a_large_vocabulary():
    a, b = generate(3000, seed=1), generate(3000, seed=1)
    assert a == b and generate(50, seed=2) != a[:50]
    words = vocabulary(a)
    assert len(words) >= 300, len(words)
    assert all(set(s) <= set("abcdefghijklmnopqrstuvwxyz' ") for s in a)
