"""Open-vocabulary training utterances for the demo model (``make_data.py --open-words N``).

The demo corpus speaks 497 words, so the model learns to write those words and little else: a name
it never heard comes out as the nearest known phrase, and contextual biasing cannot pull it back
(docs/biasing.md). This source adds utterances of the demo's voice-assistant domain in which one or
two words **outside** that vocabulary occur, spelled as the word list spells them: names, places and
brands (the list's capitalised entries) and rare common words, in the sentence kinds of the
biasing test set (a contact in a call or message, a city in a weather question, a shop in a
navigation request ...; ``bias_data._templates``), spoken by **training voices** only
(``make_data._pick_voice(..., "train")``).

The words come from the system word list, Debian's ``wamerican`` (``/usr/share/dict/american-english``;
``make demo-data`` installs it): letters only, 3 to 12 of them, lower-cased, never a word of the
demo vocabulary, and **never a word of the biasing test set's phrases nor of its 100 unrelated
phrases**, so that the set stays a measure of words the model never heard.
"""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bias_data  # noqa: E402
from sentences import Grammar  # noqa: E402

WORD_LIST = Path("/usr/share/dict/american-english")
VOCABULARY = bias_data.WORDS  # models/demo/words.txt
KINDS = {"contact": 0.3, "city": 0.25, "venue": 0.15, "app": 0.08, "product": 0.12, "device": 0.1}
CONTACT_TITLES = ["doctor", "cousin", "mister", "nurse"]  # not "uncle" or "aunt": test-set phrase words
DEVICE_NOUNS = ["fan", "television", "speaker", "heater", "lamp", "machine"]


def reserved_words() -> set[str]:
    """Every word of the biasing test set's phrases and of its unrelated phrases."""
    phrases = [p for _, p in bias_data.phrases()] + list(bias_data.UNRELATED)
    return {w for p in phrases for w in p.split()}


def open_words(word_list: Path = WORD_LIST, vocabulary: Path = VOCABULARY) -> tuple[list[str], list[str]]:
    """(proper nouns, common words) of ``word_list``, lower-cased and sorted: 3 to 12 letters a-z,
    an initial capital at most (no possessives, no acronyms, which a synthesizer spells out letter
    by letter), none in ``vocabulary`` nor in ``reserved_words()``."""
    if not word_list.is_file():
        raise FileNotFoundError(f"{word_list}: the word list of --open-words (Debian: wamerican; "
                                "'make demo-data' installs it)")
    known = set(vocabulary.read_text().split()) | reserved_words()
    proper, common = set(), set()
    for entry in word_list.read_text(encoding="utf-8", errors="replace").split():
        if not re.fullmatch(r"[A-Z]?[a-z]{2,11}", entry) or entry.lower() in known:  # no acronyms
            continue
        (proper if entry[0].isupper() else common).add(entry.lower())
    common -= proper  # "bill" and "Bill": a name when the list also has it as one
    return sorted(proper), sorted(common)


def open_phrase(kind: str, rng: random.Random, proper: list[str], common: list[str]) -> str:
    """A phrase of ``kind`` (``KINDS``) built from open words: mostly proper nouns, a rare common
    word in about one slot of four."""
    def word() -> str:
        return rng.choice(common if rng.random() < 0.25 else proper)
    if kind == "contact":
        r = rng.random()
        return word() if r < 0.5 else f"{word()} {word()}" if r < 0.8 else f"{rng.choice(CONTACT_TITLES)} {word()}"
    if kind in ("city", "venue"):
        return word() if rng.random() < 0.7 else f"{word()} {word()}"
    if kind == "device":
        return f"{word()} {rng.choice(DEVICE_NOUNS)}" if rng.random() < 0.6 else word()
    return word()


def sentences(count: int, seed: int, word_list: Path = WORD_LIST) -> list[str]:
    """``count`` sentences of the demo domain, each holding an open phrase, reproducible from ``seed``."""
    proper, common = open_words(word_list)
    rng = random.Random(seed)
    templates = bias_data._templates(Grammar(random.Random(seed + 1)))
    kinds, weights = list(KINDS), list(KINDS.values())
    out = []
    for _ in range(count):
        kind = rng.choices(kinds, weights)[0]
        out.append(" ".join(rng.choice(templates[kind])(open_phrase(kind, rng, proper, common)).split()))
    return out
