"""Contextual-biasing test set for the demo model (``tests/data/bias-phrases``).

Utterances of the demo's voice-assistant domain (``sentences.py``'s kind of sentence) in which a
name, place or brand occurs that the demo model never heard in training: at least one word of each
phrase is outside ``models/demo/words.txt``. Each phrase is said twice, in two sentences of the
phrase's kind (a contact in a call or a message, a city in a weather question, a shop in a
navigation request ...), by the **held-out voices** of the demo's test split only
(``make_data._pick_voice(..., "test")``: espeak-ng accent ``en-029`` and variants ``f4``, ``m6``,
``Annie``, ``Gene``, ``Lee``, ``steph2``, ``marcelo``, flite ``rms``, festival ``ked_diphone``),
through the same synthesis and sox finish as the corpus (``make_data.synthesize``). Everything is
drawn from ``--seed``, so the set is rebuilt bit for bit:

    .venv/bin/python train/bias_data.py --out tests/data/bias-phrases

Writes ``OUT/NNNNNN.flac`` (16 kHz, 16-bit FLAC) and ``OUT/manifest.jsonl`` with
``{"audio", "text", "voice", "duration", "phrase"}`` per utterance, and ``OUT/unrelated.txt``:
``UNRELATED``, 100 phrases (names, places, brands) that occur in none of the ordinary held-out
utterances (``tests/data/demo-heldout``) nor in this set, for measuring what a request's phrase
list costs on speech that does not contain them. ``--only N ...`` synthesizes just those
utterances (the check that the committed audio is the recipe's).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_data  # noqa: E402
from sentences import DICTATION, GENRES, GROCERIES, Grammar  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORDS = ROOT / "models" / "demo" / "words.txt"

# Phrases by kind; every one holds at least one word outside the demo's training vocabulary.
CONTACTS = ["beatrice", "harriet", "gregory", "natalie", "vanessa", "benjamin", "samantha", "patrick",
            "rebecca", "jonathan", "victoria", "oscar", "uncle walter", "aunt margaret", "doctor hoffman"]
CITIES = ["amsterdam", "barcelona", "stockholm", "helsinki", "melbourne", "nairobi", "montreal",
          "vancouver", "copenhagen", "budapest", "singapore", "bangkok", "cairo", "florence", "venice",
          "brussels", "new orleans", "san francisco", "las vegas"]
VENUES = ["starbucks", "walmart", "ikea", "costco", "home depot", "whole foods", "taco bell", "best buy"]
APPS = ["spotify", "netflix", "pandora", "youtube"]
PRODUCTS = ["nutella", "cheerios", "pepsi", "kleenex"]
BRANDED_DEVICES = ["dyson fan", "samsung television", "nespresso machine", "roomba"]

# 100 phrases for the unrelated-phrases check: none occurs in this set or in the ordinary held-out
# utterances (checked by ``unrelated_phrases``).
UNRELATED = [
    # contacts
    "abigail", "alexander", "amelia", "anthony", "arthur", "barbara", "bernard", "caroline", "charlotte",
    "christopher", "cynthia", "deborah", "dorothy", "edward", "eleanor", "elizabeth", "frederick",
    "gabriel", "harold", "isabella", "jacqueline", "jennifer", "joseph", "katherine", "leonard",
    "margaret thompson", "matthew", "melissa", "nicholas", "pamela", "raymond", "rosemary", "sebastian",
    "stephanie", "timothy", "valerie", "vincent", "william", "doctor patel", "professor gupta",
    # places
    "edinburgh", "glasgow", "manchester", "liverpool", "birmingham", "marseille", "lyon", "naples",
    "milan", "zurich", "hamburg", "munich", "geneva", "warsaw", "athens", "santiago", "antwerp", "rotterdam", "cologne", "frankfurt", "krakow", "belgrade",
    "istanbul", "jerusalem", "mumbai", "delhi", "shanghai", "beijing", "seoul", "osaka", "manila",
    "jakarta", "auckland", "havana",
    # brands and products
    "amazon", "google", "microsoft", "toyota", "volkswagen", "nintendo", "playstation", "instagram",
    "whatsapp", "facebook", "uber", "lyft", "doordash", "pizza hut", "burger king", "dunkin donuts",
    "coca cola", "heineken", "lufthansa", "philips hue", "sonos", "nest thermostat", "kindle",
    "airpods", "macbook", "lego",
]


def oov_words(phrase: str, vocabulary: set[str]) -> list[str]:
    """The words of ``phrase`` that the demo model never trained on."""
    return [w for w in phrase.split() if w not in vocabulary]


def _templates(g: Grammar) -> dict[str, list]:
    """Sentence templates per phrase kind, in the grammar's style (``{}`` is the phrase)."""
    return {
        "contact": [lambda p: f"{g.polite()}call {p}{g.maybe(' on speaker', 0.2)}",
                    lambda p: f"video call {p}",
                    lambda p: f"text {p} {g.pick(DICTATION)}",
                    lambda p: f"send a message to {p} saying {g.pick(DICTATION)}",
                    lambda p: f"call {p} back at {g.time()}",
                    lambda p: f"email {p} that {g.pick(DICTATION)}",
                    lambda p: f"remind me {g.date()} to call {p}"],
        "city": [lambda p: f"what is the weather in {p}{g.maybe(' ' + g.date())}",
                 lambda p: f"will it {g.pick(['rain', 'snow', 'be windy', 'be sunny', 'be cold'])} in {p} {g.date()}",
                 lambda p: f"how {g.pick(['hot', 'cold', 'warm'])} is it in {p}",
                 lambda p: f"what time is it in {p}",
                 lambda p: f"take me to {p}",
                 lambda p: f"book the flight to {p}"],
        "venue": [lambda p: f"{g.polite()}navigate to {p}",
                  lambda p: f"find a {p} near me",
                  lambda p: f"how far is the nearest {p}",
                  lambda p: f"is there traffic on the way to {p}",
                  lambda p: f"how long does it take to get to {p}"],
        "app": [lambda p: f"{g.polite()}play {g.pick(GENRES)} on {p}",
                lambda p: f"open {p}{g.maybe(' in the living room')}",
                lambda p: f"play the next episode on {p}",
                lambda p: f"turn the volume {g.pick(['up', 'down'])} on {p}"],
        "product": [lambda p: f"{g.polite()}add {p} to my shopping list",
                    lambda p: f"add {p} and {g.pick(GROCERIES)} to my shopping list",
                    lambda p: f"order {g.small_number()} {g.pick(['bottles', 'boxes', 'packs', 'bags'])} of {p}",
                    lambda p: f"do we need {p}",
                    lambda p: f"remove {p} from the shopping list"],
        "device": [lambda p: f"{g.polite()}turn {g.pick(['on', 'off'])} the {p}",
                   lambda p: f"is the {p} in the {g.pick(['kitchen', 'living room', 'bedroom', 'office'])} still on",
                   lambda p: f"start the {p} at {g.time()}"],
    }


def phrases() -> list[tuple[str, str]]:
    """(kind, phrase) of every phrase of the set, in file order."""
    kinds = [("contact", CONTACTS), ("city", CITIES), ("venue", VENUES), ("app", APPS),
             ("product", PRODUCTS), ("device", BRANDED_DEVICES)]
    return [(kind, p) for kind, items in kinds for p in items]


def plan(seed: int, per_phrase: int = 2) -> list[make_data.Job]:
    """``per_phrase`` utterances of every phrase, each in a different template, by held-out voices.
    Returns the jobs with ``job.index`` the file number; the phrase is ``PHRASE_OF[index]``."""
    rng = random.Random(seed)
    g = Grammar(random.Random(seed + 1))
    templates = _templates(g)
    jobs = []
    for kind, phrase in phrases():
        for template in rng.sample(templates[kind], per_phrase):
            text = " ".join(template(phrase).split())
            synth, voice = make_data._pick_voice(rng, "test")
            jobs.append(make_data.Job(len(jobs), "bias", text, synth, voice, rng.randrange(2**31)))
    return jobs


def phrase_of(job: make_data.Job, per_phrase: int = 2) -> str:
    return phrases()[job.index // per_phrase][1]


def unrelated_phrases(heldout_texts: list[str]) -> list[str]:
    """``UNRELATED``, checked: 100 distinct phrases, none in a held-out text or in this set."""
    padded = [f" {t} " for t in heldout_texts]
    ours = {p for _, p in phrases()}
    assert len(UNRELATED) == 100 and len(set(UNRELATED)) == 100, len(UNRELATED)
    for p in UNRELATED:
        assert p not in ours, p
        assert not any(f" {p} " in t for t in padded), f"{p!r} occurs in a held-out utterance"
    return list(UNRELATED)


def check(jobs: list[make_data.Job], vocabulary: set[str]) -> None:
    for job in jobs:
        phrase = phrase_of(job)
        assert f" {phrase} " in f" {job.text} ", (phrase, job.text)
        assert oov_words(phrase, vocabulary), f"{phrase!r}: every word is in the training vocabulary"
        assert job.voice.split("+")[0] in make_data.TEST_ESPEAK_BASES + make_data.TRAIN_ESPEAK_BASES + \
            make_data.TEST_FLITE + make_data.TEST_FESTIVAL, job.voice
        if job.synth == "espeak-ng":
            assert job.voice.split("+")[1] in make_data.TEST_ESPEAK_VARIANTS, job.voice
        elif job.synth == "flite":
            assert job.voice in make_data.TEST_FLITE, job.voice
        else:
            assert job.voice in make_data.TEST_FESTIVAL, job.voice


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "bias-phrases")
    p.add_argument("--seed", type=int, default=20261207)
    p.add_argument("--heldout", type=Path, default=ROOT / "tests" / "data" / "demo-heldout" / "manifest.jsonl",
                   help="the ordinary held-out utterances that the unrelated phrases must not occur in")
    p.add_argument("--only", type=int, nargs="+", metavar="N",
                   help="synthesize only these utterances (file numbers); writes no manifest")
    args = p.parse_args(argv)
    vocabulary = set(WORDS.read_text().split())
    jobs = plan(args.seed)
    check(jobs, vocabulary)
    heldout = [json.loads(line)["text"] for line in args.heldout.read_text().splitlines() if line.strip()]
    unrelated = unrelated_phrases(heldout)
    if args.only:
        jobs = [j for j in jobs if j.index in set(args.only)]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "bias").mkdir()
        for job in jobs:
            row = make_data.synthesize(job, Path(tmp))
            name = Path(row["audio"]).name
            shutil.move(Path(tmp) / row["audio"], args.out / name)
            rows.append(dict(row, audio=name, phrase=phrase_of(job)))
            print(f"{name} {row['voice']:28s} {row['text']}", flush=True)
    if args.only:
        return 0
    with open(args.out / "manifest.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    (args.out / "unrelated.txt").write_text("\n".join(unrelated) + "\n")
    seconds = sum(r["duration"] for r in rows)
    size = sum((args.out / r["audio"]).stat().st_size for r in rows)
    print(f"{len(rows)} utterances, {len({r['phrase'] for r in rows})} phrases, {seconds:.0f} s, "
          f"{size / 1e6:.1f} MB -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
