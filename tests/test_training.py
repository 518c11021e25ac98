"""The demo model's training recipe: a few steps on a handful of utterances.

Runs ``train/train_demo.py`` on the bundled samples (real recipe, features, loss
and checkpointing; no augmentation so the loss is comparable step to step) and
checks that the loss falls, that a checkpoint resumes where it stopped, and that
export writes files the server's loader reads.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch
import torchaudio.functional

from server.model.loading import load_demo
from tests.conftest import ROOT, SAMPLES

sys.path.insert(0, str(ROOT / "train"))
import average_models  # noqa: E402
import make_data  # noqa: E402
import open_words  # noqa: E402
import train_demo  # noqa: E402
import voice_warp  # noqa: E402
from sentences import generate, vocabulary  # noqa: E402
from server.model.features import GlobalStats  # noqa: E402


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


def _median_pitch(audio: np.ndarray, rate: int) -> float:
    """Median fundamental frequency in Hz of the loudest 40 % of 40 ms frames (autocorrelation
    peak between 60 and 400 Hz)."""
    frame = int(0.04 * rate)
    frames = np.stack([audio[i:i + frame] for i in range(0, len(audio) - frame, frame // 2)])
    energy = (frames ** 2).sum(1)
    low, high = rate // 400, rate // 60
    f0s = []
    for f in frames[energy > np.percentile(energy, 60)]:
        ac = np.correlate(f - f.mean(), f - f.mean(), "full")[frame - 1:]
        f0s.append(rate / (low + int(np.argmax(ac[low:high]))))
    return float(np.median(f0s))


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

    # the trainer keeps its newest periodic checkpoints; export can average their weights
    kept = train_demo.kept_checkpoints(work)
    assert [p.name for p in kept] == ["step-000024.pt", "step-000026.pt"]  # --max-steps 24, then 26
    averaged = tmp_path / "averaged"
    assert train_demo.main(["--work-dir", str(work), "--export", str(averaged), "--export-checkpoint", "average"]) == 0
    states = [torch.load(p, weights_only=False)["model"] for p in kept]
    for name, tensor in torch.load(averaged / "model.pt").items():
        if tensor.is_floating_point():
            assert torch.allclose(tensor, (states[0][name] + states[1][name]) / 2), name
    assert json.loads((averaged / "train_summary.json").read_text())["averaged_steps"] == [24, 26]
    assert load_demo(averaged).num_parameters == model.num_parameters
    with pytest.raises(SystemExit, match="keeps 0 step"):
        train_demo.main(["--work-dir", str(tmp_path), "--export", str(averaged), "--export-checkpoint", "average"])

    # fine-tuning starts from the exported weights and stats and records where it started
    tuned_work, tuned = tmp_path / "tuned-work", tmp_path / "tuned"
    tuned_args = common[:2] + ["--work-dir", str(tuned_work)] + common[4:] + ["--init", str(out)]
    capsys.readouterr()
    assert train_demo.main(tuned_args + ["--max-steps", "2"]) == 0
    assert f"initialised from {out}" in capsys.readouterr().out
    first_tuned = _losses(tuned_work)[0]
    assert first_tuned < first, f"a fine-tuned first step ({first_tuned:.1f}) should start below a fresh one"
    assert train_demo.main(["--work-dir", str(tuned_work), "--export", str(tuned)]) == 0
    summary = json.loads((tuned / "train_summary.json").read_text())
    assert summary["fine_tuned_from"] == json.loads((out / "train_summary.json").read_text())
    assert summary["step"] == 2
    assert summary["total_trained_minutes"] == round(summary["trained_minutes"] + summary["fine_tuned_from"]
                                                     ["trained_minutes"], 1)
    assert (tuned / "global_stats.json").read_text() == (out / "global_stats.json").read_text()


def test_sentence_generator_is_reproducible_and_covers_a_large_vocabulary():
    a, b = generate(3000, seed=1), generate(3000, seed=1)
    assert a == b and generate(50, seed=2) != a[:50]
    words = vocabulary(a)
    assert len(words) >= 300, len(words)
    assert all(set(s) <= set("abcdefghijklmnopqrstuvwxyz' ") for s in a)


def test_vocal_tract_warp_moves_a_formant_and_is_the_identity_at_one():
    assert np.allclose(train_demo.vtlp_source_index(1.0), np.arange(80))
    stats = GlobalStats.load(ROOT / "models" / "demo" / "global_stats.json")
    mean, inv = torch.tensor(stats.mean), torch.tensor(stats.invstddev)
    log_mel = torch.full((5, 80), 4.0)
    log_mel[:, 30] = 12.0  # one formant-like peak
    feats = (log_mel - mean) * inv

    class Fixed:  # a generator whose draws pick the warp factor and skip the tilt
        def __init__(self, alpha):
            self.draws = iter([0.0, alpha, 0.9])

        def random(self):
            return next(self.draws)

        def uniform(self, lo, hi):
            return next(self.draws)

    def peak(alpha):
        out = train_demo.timbre_augment(feats, stats, Fixed(alpha))
        return int((out / inv + mean)[0].argmax())

    assert peak(1.0) == 30
    assert peak(1.12) > 30 > peak(0.88)  # formants higher / lower by the vocal-tract factor
    # neither augmentation: the features come back unchanged
    same = train_demo.timbre_augment(feats, stats, np.random.default_rng(0), warp=0.0, tilt=0.0)
    assert torch.allclose(same, feats, atol=1e-4)


def test_random_voices_add_training_jobs_without_changing_any_split():
    base = make_data.plan(200, 20, 30, seed=7)
    more = make_data.plan(200, 20, 30, seed=7, random_voices=50, espeak_path="/x")
    assert more[:len(base)] == base
    extra = more[len(base):]
    train_sentences = {j.text for j in base if j.split == "train"}
    assert len(extra) == 50 and all(j.split == "train" and j.text in train_sentences for j in extra)
    assert [j.index for j in extra] == list(range(200, 250))
    held_out = set(make_data.TEST_ESPEAK_VARIANTS) | {"Gene2"}
    assert not {j.voice.split("+")[1] for j in extra} & held_out
    assert {j.voice.split("+")[0] for j in extra} <= set(make_data.TRAIN_ESPEAK_BASES) | {"en"}


def test_a_random_espeak_voice_speaks(tmp_path):
    root = make_data.espeak_data_with_random_variants(tmp_path, seed=7)
    variant = (root / "espeak-ng-data" / "voices" / "!v" / "rv000").read_text()
    assert variant == make_data.random_variant("rv000", random.Random(7 + 3))
    wavs = []
    for voice in ("en-us+rv000", "en-us+rv001"):
        wav = tmp_path / f"{voice}.wav"
        subprocess.run(["espeak-ng", f"--path={root}", "-v", voice, "-w", str(wav), "set a timer"], check=True)
        wavs.append(soundfile.read(wav)[0])
    assert all(len(w) > 8000 for w in wavs)  # half a second of speech at 22 kHz or more
    assert len(wavs[0]) != len(wavs[1]) or not np.array_equal(wavs[0], wavs[1])  # two different voices
    # every base the random voices use takes a variant (espeak-ng silently drops one after "en-gb")
    plain = tmp_path / "plain.wav"
    extra = make_data.plan(50, 1, 1, 7, random_voices=200)[52:]
    for base in {j.voice.split("+")[0] for j in extra}:
        subprocess.run(["espeak-ng", "-v", base, "-w", str(plain), "set a timer"], check=True)
        varied = tmp_path / "varied.wav"
        subprocess.run(["espeak-ng", f"--path={root}", "-v", f"{base}+rv000", "-w", str(varied), "set a timer"],
                       check=True)
        assert plain.read_bytes() != varied.read_bytes(), base


def test_pico_and_festival_prosody_jobs_add_training_voices_without_changing_any_split(tmp_path):
    base = make_data.plan(200, 20, 30, seed=7, random_voices=10, espeak_path="/x")
    more = make_data.plan(200, 20, 30, seed=7, random_voices=10, espeak_path="/x", pico=12, festival_prosody=4)
    assert more[:len(base)] == base
    extra = more[len(base):]
    assert [j.index for j in extra] == list(range(210, 226))
    assert {(j.synth, j.voice) for j in extra[:12]} == {("pico", "en-US"), ("pico", "en-GB")}
    assert all(j.synth == "festival" and j.voice == "kal_diphone" and j.prosody for j in extra[12:])
    assert {j.text for j in extra} <= {j.text for j in base if j.split == "train"}
    # Both synthesize for real: Pico reads its speed/pitch markup (the tags are not spoken), and
    # festival's random pitch level moves the pitch while the plan's own festival jobs draw as before.
    (tmp_path / "train").mkdir()
    rows = [make_data.synthesize(job, tmp_path) for job in (extra[0], extra[12])]
    for row, job in zip(rows, (extra[0], extra[12])):
        audio, rate = soundfile.read(tmp_path / row["audio"])
        assert rate == 16000 and row["voice"] == f"{job.synth}:{job.voice}"
        assert 0.3 * len(job.text.split()) < len(audio) / rate < 1.5 * len(job.text.split()) + 1, row
    # Seeds 15 and 8 draw a target pitch mean of 72 and 214 Hz (the other draws stay within +-15 %).
    pitches = {}
    for seed in (15, 8):
        job = make_data.Job(0, "train", "set a timer for ten minutes", "festival", "kal_diphone", seed, prosody=True)
        audio, rate = soundfile.read(tmp_path / make_data.synthesize(job, tmp_path)["audio"], dtype="float32")
        pitches[seed] = _median_pitch(audio, rate)
    assert pitches[8] > 1.6 * pitches[15], pitches


def test_accent_rhvoice_and_kokoro_jobs_add_training_voices_without_changing_any_split():
    base = make_data.plan(200, 20, 30, seed=7, random_voices=10, espeak_path="/x", pico=3, festival_prosody=2)
    more = make_data.plan(200, 20, 30, seed=7, random_voices=10, espeak_path="/x", pico=3, festival_prosody=2,
                          random_accents=40, rhvoice=20, kokoro=10, kokoro_cache="/k")
    assert more[:len(base)] == base
    accents, rhvoice, kokoro = more[len(base):len(base) + 40], more[len(base) + 40:-10], more[-10:]
    assert [j.index for j in accents] == list(range(make_data.ACCENT_INDEX_BASE, make_data.ACCENT_INDEX_BASE + 40))
    assert [j.index for j in rhvoice] == list(range(make_data.RHVOICE_INDEX_BASE, make_data.RHVOICE_INDEX_BASE + 20))
    assert [j.index for j in kokoro] == list(range(make_data.KOKORO_INDEX_BASE, make_data.KOKORO_INDEX_BASE + 10))
    assert {j.text for j in more[len(base):]} <= {j.text for j in base if j.split == "train"}
    assert all(j.split == "train" for j in more[len(base):])
    # one source's count changes nothing in the others' jobs
    fewer = make_data.plan(200, 20, 30, seed=7, random_voices=10, espeak_path="/x", pico=3, festival_prosody=2,
                           random_accents=5, rhvoice=20, kokoro=10, kokoro_cache="/k")
    assert fewer[len(base) + 5:] == more[len(base) + 40:]
    held_out = set(make_data.TEST_ESPEAK_VARIANTS) | {"Gene2"}
    assert all(j.voice.startswith("en-x-ra") and j.voice.split("+")[1] not in held_out for j in accents)
    assert {j.voice for j in rhvoice} <= set(make_data.RHVOICE_VOICES)
    assert {v for j in kokoro for v in j.voice.replace("/", "+").split("+")} <= set(make_data.neural_tts.VOICES)


def test_open_word_jobs_hold_unseen_words_by_training_voices_without_changing_any_split():
    """--open-words: training jobs only, numbered from OPEN_WORDS_INDEX_BASE, each sentence holding
    a word outside the demo vocabulary and no word of the biasing test set's phrases (which must stay
    unheard), spoken by training voices; the other jobs stay the same."""
    base = make_data.plan(200, 20, 30, seed=7)
    more = make_data.plan(200, 20, 30, seed=7, open_words=60)
    assert more[:len(base)] == base
    extra = more[len(base):]
    assert [j.index for j in extra] == list(range(make_data.OPEN_WORDS_INDEX_BASE, make_data.OPEN_WORDS_INDEX_BASE + 60))
    assert all(j.split == "train" for j in extra)
    assert make_data.plan(200, 20, 30, seed=7, open_words=20)[len(base):] == extra[:20]
    vocabulary = set((ROOT / "models" / "demo" / "words.txt").read_text().split())
    reserved = open_words.reserved_words()
    assert {"beatrice", "nairobi", "spotify", "edinburgh"} <= reserved
    for job in extra:
        words = job.text.split()
        assert any(w not in vocabulary for w in words), job.text
        assert not reserved & set(words) - vocabulary, job.text
        assert re.fullmatch(r"[a-z' ]+", job.text), job.text
        synth, voice = job.synth, job.voice
        if synth == "espeak-ng":
            assert voice.split("+")[0] in make_data.TRAIN_ESPEAK_BASES, voice
            assert voice.split("+")[1] in make_data.TRAIN_ESPEAK_VARIANTS, voice
        else:
            assert voice in make_data.TRAIN_FLITE + make_data.TRAIN_FESTIVAL, voice
    proper, common = open_words.open_words()
    assert len(proper) > 5000 and len(common) > 20000 and not set(proper) & set(common)
    assert not (set(proper) | set(common)) & (vocabulary | reserved)


def test_subsample_base_thins_only_the_base_training_jobs():
    jobs = make_data.plan(200, 20, 30, seed=7, random_voices=10, espeak_path="/x", pico=3, festival_prosody=2,
                          random_accents=12, rhvoice=6)
    thinned = make_data.subsample_base(jobs, 4)
    base_train = [j for j in jobs if j.split == "train" and j.index < make_data.ACCENT_INDEX_BASE]
    assert len(base_train) == 215
    kept = [j for j in thinned if j.split == "train" and j.index < make_data.ACCENT_INDEX_BASE]
    assert kept == [j for j in base_train if j.index % 4 == 0] and len(kept) == 54
    assert [j for j in thinned if j not in kept] == [j for j in jobs if j not in base_train]  # held-out, new sources
    assert make_data.subsample_base(jobs, 1) == jobs


def test_exclude_sentences_drops_only_held_out_jobs_with_a_listed_sentence(tmp_path):
    default = make_data.plan(300, 20, 40, seed=7)
    other = make_data.plan(300, 20, 40, seed=8)
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps({"text": j.text}) + "\n" for j in default if j.split == "train"))
    seen = make_data.read_sentences(manifest)
    assert seen == {j.text for j in default if j.split == "train"}
    kept = make_data.exclude_held_out_sentences(other, seen)
    held_out = [j for j in other if j.split != "train"]
    assert any(j.text in seen for j in held_out)  # a second seed's held-out sentences overlap training
    assert [j for j in kept if j.split != "train"] == [j for j in held_out if j.text not in seen]
    assert [j for j in kept if j.split == "train"] == [j for j in other if j.split == "train"]
    plain = tmp_path / "sentences.txt"
    plain.write_text("set a timer\n\nturn on the lights\n")
    assert make_data.read_sentences(plain) == {"set a timer", "turn on the lights"}


def test_random_accents_use_only_training_accents_tables_and_change_the_pronunciation(tmp_path):
    root = make_data.espeak_data_with_random_variants(tmp_path, seed=7)
    lang = root / "espeak-ng-data" / "lang" / "gmw"
    accents = sorted(lang.glob("en-x-ra*"))
    assert len(accents) == make_data.NUM_RANDOM_ACCENTS
    for path in accents:
        fields = dict(line.split(" ", 1) for line in path.read_text().splitlines() if not line.startswith("replace"))
        assert fields["phonemes"] in make_data.ACCENT_PHONEME_TABLES  # never en-wi, the held-out accent's
        assert "8" not in fields.get("dictrules", "").split()  # nor its dictionary rules
    # every accent is in espeak-ng's voice list (it holds 349), and the held-out variants are gone
    listed = subprocess.run(["espeak-ng", f"--path={root}", "--voices"], check=True, capture_output=True, text=True)
    assert all(f"en-x-{p.name[5:]}" in listed.stdout for p in accents) and "maximum" not in listed.stderr
    assert not (root / "espeak-ng-data" / "voices" / "!v" / "Annie").exists()

    # a TH-stopping accent says "the" with a d, where the plain table says it with a D (eth)
    stopping = next(p for p in accents if "replace 00 D d" in p.read_text())
    def phonemes(voice):
        return subprocess.run(["espeak-ng", f"--path={root}", "-q", "-x", "-v", voice, "turn on the lights"],
                              check=True, capture_output=True, text=True).stdout
    table = dict(line.split(" ", 1) for line in stopping.read_text().splitlines())["phonemes"]
    plain_voice = {"en": "en", "en-us": "en-us", "en-sc": "en-gb-scotland", "en-rp": "en-gb-x-rp",
                   "en-n": "en-gb-x-gbclan", "en-wm": "en-gb-x-gbcwmd", "en-us-nyc": "en-us-nyc"}[table]
    assert "D" in phonemes(plain_voice)  # espeak-ng's D is the eth of "the"
    accented = phonemes(f"en-x-{stopping.name[5:]}+rv000")
    assert "D" not in accented and "nd" in accented, accented  # "on the" -> "0nd@"


def test_rhvoice_and_kokoro_speak_the_sentence(tmp_path):
    (tmp_path / "train").mkdir()
    jobs = [make_data.Job(0, "train", "set a timer for ten minutes", "rhvoice", "bdl", 3),
            make_data.Job(1, "train", "set a timer for ten minutes", "kokoro", "jf_alpha+jm_kumo/jf_nezumi+jm_kumo",
                          3, kokoro_cache=str(tmp_path / "kokoro")),
            make_data.Job(2, "train", "set a timer for ten minutes", "kokoro", "jm_kumo+jm_kumo",
                          3, kokoro_cache=str(tmp_path / "kokoro"))]
    rows = [make_data.synthesize(job, tmp_path) for job in jobs]
    audios = []
    for row, job in zip(rows, jobs):
        audio, rate = soundfile.read(tmp_path / row["audio"], dtype="float32")
        assert rate == 16000 and row["voice"] == f"{job.synth}:{job.voice}"
        assert 1.0 < len(audio) / rate < 5.0, row
        assert np.sqrt(np.mean(audio ** 2)) > 0.02  # speech, not silence
        audios.append(audio)
    # two Kokoro voices mixed differently sound different
    assert len(audios[1]) != len(audios[2]) or not np.allclose(audios[1], audios[2])
    # the phonemes Kokoro reads: espeak-ng's IPA in Kokoro's symbols (diphthongs are single letters)
    assert make_data.neural_tts.phonemes("ten minutes", "en-us").replace("ˈ", "").replace("ˌ", "") == "tɛn mɪnɪts"
    assert "A" in make_data.neural_tts.phonemes("timer play", "en-us")  # eɪ -> A


def test_foreign_diphone_voices_read_english_through_a_mapped_lexicon(tmp_path):
    fd = make_data.foreign_diphones
    # espeak-ng's "thirty" (θˈɜːɾi): TH as t in Italian, th in Spanish; the stress on the first nucleus
    thirty = fd.ipa_words(["thirty"])["thirty"]
    assert fd.syllables(fd.phones(thirty, "italian"), "italian") == [(["t", "E1"], 1), (["r", "i"], 0)]
    assert fd.syllables(fd.phones(thirty, "spanish"), "spanish") == [(["th", "e1"], 1), (["r", "i"], 0)]
    # two consonants between nuclei: the first closes the earlier syllable
    assert [p for p, _ in fd.syllables(fd.phones("ˈɑːftɚ", "italian"), "italian")] == [["a1", "f"], ["t", "e", "r"]]
    with pytest.raises(ValueError, match="no italian phone"):
        fd.phones("qʘ", "italian")
    assert fd.festival_word("o'clock") == "oclock"

    base = make_data.plan(50, 2, 2, seed=7)
    more = make_data.plan(50, 2, 2, seed=7, foreign_diphones_count=6, lexicon_dir=str(tmp_path))
    assert more[:len(base)] == base and len(more) == len(base) + 6
    extra = more[len(base):]
    assert [j.index for j in extra] == list(range(make_data.FOREIGN_DIPHONE_INDEX_BASE,
                                                  make_data.FOREIGN_DIPHONE_INDEX_BASE + 6))
    assert all(j.synth == "festival" and j.voice in fd.FOREIGN_VOICES for j in extra)

    lexicons = make_data.write_foreign_lexicons(tmp_path, ["set a timer for o'clock", "call mom"])
    italian = (tmp_path / "festival-lexicons" / "pc_diphone.scm").read_text()
    assert lexicons == str((tmp_path / "festival-lexicons").resolve())
    assert '("oclock" nil' in italian and '("a" nil (((e) 0)))' in italian and italian.count("lex.add.entry") == 7
    (tmp_path / "train").mkdir()
    durations = {}
    for voice in fd.FOREIGN_VOICES:
        job = make_data.Job(0, "train", "set a timer for eight o'clock", "festival", voice, 5,
                            festival_lexicon=f"{lexicons}/{voice}.scm")
        audio, rate = soundfile.read(tmp_path / make_data.synthesize(job, tmp_path)["audio"], dtype="float32")
        assert rate == 16000 and np.sqrt(np.mean(audio ** 2)) > 0.02
        durations[voice] = len(audio) / rate
    assert all(1.0 < d < 4.5 for d in durations.values()), durations  # six words of speech
    # the voice reads our lexicon: without it, its own letter-to-sound rules say something else
    native = make_data.Job(1, "train", "set a timer for eight o'clock", "festival", "pc_diphone", 5)
    plain, _ = soundfile.read(tmp_path / make_data.synthesize(native, tmp_path)["audio"], dtype="float32")
    assert abs(len(plain) / 16000 - durations["pc_diphone"]) > 0.05


def test_british_diphone_voices_read_espeak_pronunciations_never_oald(tmp_path):
    fd = make_data.foreign_diphones
    assert set(fd.BRITISH_VOICES) == {"rab_diphone", "don_diphone"} and all(map(fd.installed, fd.BRITISH_VOICES))
    # British IPA (espeak-ng's en) in festival's mrpa phones: long vowels and diphthongs are one phone,
    # stress goes on the syllable (mrpa has no stressed vowels of its own)
    assert fd.syllables(fd.phones("ɐlˈɑːm", "mrpa"), "mrpa") == [(["@"], 0), (["l", "aa", "m"], 1)]
    assert [p for p, _ in fd.phones("ˈeəpɔːt", "mrpa")] == ["e@", "p", "oo", "t"]

    base = make_data.plan(50, 2, 2, seed=7, foreign_diphones_count=3, lexicon_dir="/l", mbrola=2)
    more = make_data.plan(50, 2, 2, seed=7, foreign_diphones_count=3, lexicon_dir="/l", mbrola=2,
                          british_diphones=6)
    assert more[:len(base)] == base and len(more) == len(base) + 6
    extra = more[len(base):]
    assert [j.index for j in extra] == list(range(make_data.BRITISH_DIPHONE_INDEX_BASE,
                                                  make_data.BRITISH_DIPHONE_INDEX_BASE + 6))
    assert all(j.voice in fd.BRITISH_VOICES and j.prosody and j.festival_lexicon == f"/l/{j.voice}.scm"
               for j in extra)

    lexicons = make_data.write_foreign_lexicons(tmp_path, ["set an alarm for the airport"])
    rab = (tmp_path / "festival-lexicons" / "rab_diphone.scm").read_text()
    assert '("alarm" nil (((@) 0) ((l aa m) 1)))' in rab and rab.count("lex.add.entry") == 6
    (tmp_path / "train").mkdir()
    for k, voice in enumerate(sorted(fd.BRITISH_VOICES)):
        job = make_data.Job(k, "train", "set an alarm for the airport", "festival", voice, 5,
                            festival_lexicon=f"{lexicons}/{voice}.scm", prosody=True)
        audio, rate = soundfile.read(tmp_path / make_data.synthesize(job, tmp_path)["audio"], dtype="float32")
        assert rate == 16000 and 1.0 < len(audio) / rate < 4.5 and np.sqrt(np.mean(audio ** 2)) > 0.02
        # a word outside our lexicon fails: the voice has no OALD (non-commercial) to fall back on
        unknown = make_data.Job(10 + k, "train", "set an alarm for the harbour", "festival", voice, 5,
                                festival_lexicon=f"{lexicons}/{voice}.scm")
        with pytest.raises(subprocess.CalledProcessError):
            make_data.synthesize(unknown, tmp_path)


def test_mbrola_diphone_voice_adds_training_jobs_and_speaks(tmp_path):
    base = make_data.plan(50, 2, 2, seed=7, foreign_diphones_count=3, lexicon_dir="/l")
    more = make_data.plan(50, 2, 2, seed=7, foreign_diphones_count=3, lexicon_dir="/l", mbrola=8)
    assert more[:len(base)] == base and len(more) == len(base) + 8
    extra = more[len(base):]
    assert [j.index for j in extra] == list(range(make_data.MBROLA_INDEX_BASE, make_data.MBROLA_INDEX_BASE + 8))
    assert all(j.split == "train" and j.synth == "mbrola" and j.voice in make_data.MBROLA_VOICES for j in extra)
    assert make_data.MBROLA_VOICES == ["en1"]  # the one English MBROLA voice licensed for any use
    assert make_data.mbrola_installed("en1")  # make test-apt installs it
    assert not make_data.mbrola_installed("xx9")

    (tmp_path / "train").mkdir()
    audios = []
    for k, seed in enumerate((3, 4)):
        row = make_data.synthesize(make_data.Job(k, "train", "set a timer for ten minutes", "mbrola", "en1", seed),
                                   tmp_path)
        audio, rate = soundfile.read(tmp_path / row["audio"], dtype="float32")
        assert rate == 16000 and row["voice"] == "mbrola:en1"
        assert 1.0 < len(audio) / rate < 5.0 and np.sqrt(np.mean(audio ** 2)) > 0.02, row  # speech, not silence
        audios.append(audio)
    assert len(audios[0]) != len(audios[1])  # another seed, another rate, pitch and padding


def _formants(audio: np.ndarray, rate: int, count: int = 3) -> list[float]:
    """The lowest ``count`` resonance frequencies (Hz) of an order-``2 * count`` LPC fit of ``audio``."""
    a = voice_warp.lpc((audio * np.hanning(len(audio)))[None], 2 * count)[0]
    poles = np.roots(a)
    return sorted(np.angle(poles[poles.imag > 0]) * rate / (2 * np.pi))


def test_voice_warp_moves_each_formant_by_its_own_factor_and_is_exact_at_identity():
    rate = 16000
    pulses = np.zeros(rate)
    pulses[::123] = 1.0  # a 130 Hz voice through three resonances
    vowel = torch.from_numpy(pulses)
    for hz, bandwidth in ((700, 80), (1800, 120), (3000, 150)):
        r, theta = np.exp(-np.pi * bandwidth / rate), 2 * np.pi * hz / rate
        vowel = torchaudio.functional.lfilter(vowel, torch.tensor([1.0, -2 * r * np.cos(theta), r * r]),
                                              torch.tensor([1.0, 0.0, 0.0]), clamp=False)
    vowel = vowel.numpy()
    same = voice_warp.warp_voice(vowel, rate, voice_warp.VoiceWarp.identity())
    assert np.max(np.abs(same - vowel)) < 1e-9 * np.max(np.abs(vowel))  # analysis and resynthesis invert

    def measured(warp):
        out = voice_warp.warp_voice(vowel, rate, warp)
        assert len(out) == len(vowel)
        # energy kept frame by frame
        assert 0.8 < np.sqrt(np.mean(out[2000:-2000] ** 2) / np.mean(vowel[2000:-2000] ** 2)) < 1.25
        return np.array(_formants(out[4000:5024], rate))

    before = np.array(_formants(vowel[4000:5024], rate))
    assert np.allclose(before, [700, 1800, 3000], rtol=0.04)
    higher = measured(voice_warp.VoiceWarp((1.12,) * 5, 1.0))  # a shorter vocal tract: every formant up
    assert np.all(higher / before > 1.07), higher
    # the first formant down, the third up: the relation between formants changes
    mixed = measured(voice_warp.VoiceWarp((0.88, 0.88, 1.0, 1.12, 1.12), 1.0))
    assert mixed[0] < 0.94 * before[0] and mixed[2] > 1.06 * before[2], mixed
    rng = random.Random(3)
    warps = [voice_warp.VoiceWarp.random(rng) for _ in range(50)]
    assert len(set(warps)) == 50 and all(0.7 < f < 1.3 for w in warps for f in w.factors)


def test_warped_voices_add_training_jobs_of_training_voices_and_speak(tmp_path):
    base = make_data.plan(50, 2, 2, seed=7, lexicon_dir="/l", british_diphones=2)
    more = make_data.plan(50, 2, 2, seed=7, lexicon_dir="/l", british_diphones=2, warped_voices=40)
    assert more[:len(base)] == base and len(more) == len(base) + 40
    extra = more[len(base):]
    assert [j.index for j in extra] == list(range(make_data.WARPED_VOICE_INDEX_BASE,
                                                  make_data.WARPED_VOICE_INDEX_BASE + 40))
    held_out = set(make_data.TEST_FLITE) | set(make_data.TEST_FESTIVAL)
    assert all(j.warp and j.split == "train" and j.voice not in held_out for j in extra)
    assert {j.voice for j in extra} == {v for _, v, _ in make_data.WARPED_VOICE_SOURCES}
    for j in extra:  # rab and don read espeak-ng's pronunciations (never OALD); kal its own lexicon
        assert j.festival_lexicon == (f"/l/{j.voice}.scm" if j.voice in make_data.foreign_diphones.VOICES else None)
    flite = make_data.plan(50, 2, 2, seed=7, lexicon_dir="/l", british_diphones=2, warped_voices=40,
                           warped_synthesizers=("flite",))
    assert flite[:len(base)] == base  # only flite's warped jobs, each the same job as in the full plan
    assert flite[len(base):] == [j for j in extra if j.synth == "flite"] and 0 < len(flite) - len(base) < 40

    lexicons = make_data.write_foreign_lexicons(tmp_path, ["set an alarm for the airport"])
    (tmp_path / "train").mkdir()
    for k, (synth, voice) in enumerate((("festival", "kal_diphone"), ("festival", "don_diphone"),
                                        ("flite", "awb"))):
        lexicon = f"{lexicons}/{voice}.scm" if voice == "don_diphone" else None
        plain, warped = (make_data.synthesize(make_data.Job(2 * k + w, "train", "set an alarm for the airport",
                                                            synth, voice, 11, festival_lexicon=lexicon,
                                                            warp=bool(w)), tmp_path) for w in (0, 1))
        a, rate = soundfile.read(tmp_path / plain["audio"], dtype="float32")
        b, _ = soundfile.read(tmp_path / warped["audio"], dtype="float32")
        assert rate == 16000 and np.sqrt(np.mean(b ** 2)) > 0.02
        # the same synthesis and sox draws (the speaker has a stream of its own): same length, another spectrum
        assert len(a) == len(b)
        spectra = [np.log(np.abs(np.fft.rfft(x[:len(x) // 512 * 512].reshape(-1, 512), axis=1)).mean(0) + 1e-6)
                   for x in (a, b)]
        assert np.mean(np.abs(spectra[0] - spectra[1])) > 0.05  # 0.0 without the warp (deterministic)


def test_average_models_writes_the_mean_weights_and_refuses_other_sizes(tmp_path):
    dirs = []
    for k, scale in enumerate((1.0, 3.0)):
        d = tmp_path / f"m{k}"
        d.mkdir()
        torch.save({"w": torch.full((2, 3), scale), "steps": torch.tensor([k])}, d / "model.pt")
        (d / "config.json").write_text('{"size": 1}')
        (d / "tokens.txt").write_text("a\nb\n")
        (d / "words.txt").write_text(f"words of {k}\n")
        (d / "train_summary.json").write_text(json.dumps({"step": 10 * k}))
        dirs.append(d)
    average_models.main([str(dirs[0]), str(dirs[1]), "--out", str(dirs[0])])  # --out may be an input
    weights = torch.load(dirs[0] / "model.pt", weights_only=True)
    assert torch.equal(weights["w"], torch.full((2, 3), 2.0)) and weights["steps"].tolist() == [1]
    assert (dirs[0] / "words.txt").read_text() == "words of 1\n"  # other files from the last input
    summary = json.loads((dirs[0] / "train_summary.json").read_text())
    assert summary == {"step": 10, "averaged_with": [{"step": 0}]}

    (dirs[1] / "config.json").write_text('{"size": 2}')
    with pytest.raises(SystemExit):
        average_models.main([str(dirs[0]), str(dirs[1]), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
