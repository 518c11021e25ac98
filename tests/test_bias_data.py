"""The contextual-biasing test set (``tests/data/bias-phrases``) against its recipe (``train/bias_data.py``).

What the set promises: at least 100 utterances and 50 distinct phrases, each phrase holding a word
outside the demo model's training vocabulary, said inside its utterance, by the demo test split's
held-out voices only; the 100 unrelated phrases occur in none of the ordinary held-out utterances;
and the committed audio is what the recipe synthesizes, bit for bit.
"""

from __future__ import annotations

import json
import subprocess
import sys

import soundfile

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "train"))
import bias_data  # noqa: E402
import make_data  # noqa: E402

DATA = ROOT / "tests" / "data" / "bias-phrases"
ROWS = [json.loads(line) for line in (DATA / "manifest.jsonl").read_text().splitlines()]
VOCABULARY = set((ROOT / "models" / "demo" / "words.txt").read_text().split())
HELDOUT = [json.loads(line)["text"] for line in
           (ROOT / "tests" / "data" / "demo-heldout" / "manifest.jsonl").read_text().splitlines()]


def test_set_size_phrases_and_vocabulary():
    assert len(ROWS) >= 100
    assert len({r["phrase"] for r in ROWS}) >= 50
    for r in ROWS:
        assert f" {r['phrase']} " in f" {r['text']} ", r
        assert bias_data.oov_words(r["phrase"], VOCABULARY), f"{r['phrase']!r} is all training vocabulary"
        info = soundfile.info(str(DATA / r["audio"]))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert abs(info.frames / info.samplerate - r["duration"]) < 1e-3


def test_only_held_out_voices():
    held_out_variants = set(make_data.TEST_ESPEAK_VARIANTS)
    for r in ROWS:
        synth, voice = r["voice"].split(":")
        if synth == "espeak-ng":
            base, variant = voice.split("+")
            assert variant in held_out_variants and base in make_data.ESPEAK_BASES, voice
        elif synth == "flite":
            assert voice in make_data.TEST_FLITE, voice
        else:
            assert synth == "festival" and voice in make_data.TEST_FESTIVAL, voice
    groups = {r["voice"].split("+")[0] for r in ROWS}
    assert {"espeak-ng:en-029", "flite:rms", "festival:ked_diphone"} <= groups


def test_unrelated_phrases_are_in_no_heldout_utterance_nor_in_the_set():
    unrelated = (DATA / "unrelated.txt").read_text().splitlines()
    assert len(unrelated) == len(set(unrelated)) == 100
    ours = {r["phrase"] for r in ROWS}
    for phrase in unrelated:
        assert phrase.strip() == phrase and phrase
        assert phrase not in ours
        assert not any(f" {phrase} " in f" {t} " for t in HELDOUT), phrase


def test_manifest_is_the_recipes_plan():
    jobs = bias_data.plan(20261207)
    assert [(f"{j.index:06d}.flac", j.text, f"{j.synth}:{j.voice}", bias_data.phrase_of(j)) for j in jobs] == \
        [(r["audio"], r["text"], r["voice"], r["phrase"]) for r in ROWS]


def test_recipe_rebuilds_the_audio_bit_for_bit(tmp_path):
    # one utterance of each synthesizer, the first of each
    first = {}
    for i, r in enumerate(ROWS):
        first.setdefault(r["voice"].split(":")[0], i)
    assert set(first) == {"espeak-ng", "flite", "festival"}
    subprocess.run([sys.executable, str(ROOT / "train" / "bias_data.py"), "--out", str(tmp_path), "--only",
                    *map(str, first.values())], check=True, capture_output=True)
    for i in first.values():
        name = ROWS[i]["audio"]
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name
