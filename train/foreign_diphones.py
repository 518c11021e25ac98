"""English read by festival diphone voices with espeak-ng's pronunciations: new diphone speakers.

Debian packages festival diphone voices for English (``kal``, ``ked``) and for other
languages (Italian ``pc_diphone`` and ``lp_diphone``, Spanish ``el_diphone``). A
diphone voice says any sequence of its own language's phones, so it can read English
given English pronunciations written in its phone set: espeak-ng's IPA for each word of
the demo vocabulary, mapped to the nearest Italian or Spanish phones (TH as t / d or
Spanish th, no h for Italian, English h as Spanish x, v as Spanish b), syllabified, with
espeak-ng's primary stress. The result is English with an Italian or Spanish accent,
spoken by three more diphone speakers (a female one among them) with that language's
durations and intonation.

The same route gives two British English diphone speakers, ``rab_diphone`` and
``don_diphone`` (CSTR, Edinburgh; free for any use), without their own lexicon: that
is OALD, licensed for non-commercial use only. ``prelude_scheme`` defines an empty
lexicon under OALD's name before the voice loads, so festival never reads OALD (Debian
installs it as a dependency of the voice packages), and every word's pronunciation
comes from espeak-ng's British English, mapped to the voices' MRPA phone set.

``lexicon_scheme(voice, words)`` writes the lexicon entries that a festival script
loads after selecting the voice; ``festival_word(word)`` is how a word is written in
the text festival reads (apostrophes removed: the Italian and Spanish tokenizers split
at them).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

# voice -> its phone set (a key of _TABLES)
FOREIGN_VOICES = {"pc_diphone": "italian", "lp_diphone": "italian", "el_diphone": "spanish"}
BRITISH_VOICES = {"rab_diphone": "mrpa", "don_diphone": "mrpa"}  # Debian: festvox-rablpc16k, festvox-don
VOICES = {**FOREIGN_VOICES, **BRITISH_VOICES}
FESTIVAL_VOICES = Path("/usr/share/festival/voices")
_LANGUAGE_DIRECTORY = {"italian": "italian", "spanish": "spanish", "mrpa": "english"}
_ESPEAK_ACCENT = {"italian": "en-us", "spanish": "en-us", "mrpa": "en"}  # whose pronunciations each reads


def installed(voice: str) -> bool:
    """Whether festival has ``voice`` (Debian's festvox packages install it there)."""
    return (FESTIVAL_VOICES / _LANGUAGE_DIRECTORY[VOICES[voice]] / voice).is_dir()

# IPA (espeak-ng, en-us) -> phones, longest match first; "" entries drop the symbol
_ITALIAN = {
    "eɪ": ["e", "j"], "aɪ": ["a", "j"], "ɔɪ": ["O", "j"], "aʊ": ["a", "w"], "oʊ": ["o", "w"], "əʊ": ["o", "w"],
    "ɪə": ["i", "a"], "eə": ["E", "a"], "ʊə": ["u", "a"], "tʃ": ["tS"], "dʒ": ["dZ"],
    "i": ["i"], "ɪ": ["i"], "ᵻ": ["i"], "e": ["e"], "ɛ": ["E"], "æ": ["E"], "a": ["a"], "ɑ": ["a"], "ʌ": ["a"],
    "ɐ": ["a"], "ɒ": ["O"], "ɔ": ["O"], "o": ["o"], "ʊ": ["u"], "u": ["u"], "ə": ["e"], "ɜ": ["E"],
    "ɚ": ["e", "r"], "ɝ": ["E", "r"],
    "p": ["p"], "b": ["b"], "t": ["t"], "d": ["d"], "k": ["k"], "ɡ": ["g"], "g": ["g"], "f": ["f"], "v": ["v"],
    "s": ["s"], "z": ["z"], "m": ["m"], "n": ["n"], "l": ["l"], "θ": ["t"], "ð": ["d"], "ʃ": ["S"], "ʒ": ["Z"],
    "ŋ": ["ng"], "h": [], "ɹ": ["r"], "r": ["r"], "ɾ": ["r"], "j": ["j"], "w": ["w"], "ʔ": ["t"], "x": ["k"],
}
_SPANISH = {
    "eɪ": ["e", "i0"], "aɪ": ["a", "i0"], "ɔɪ": ["o", "i0"], "aʊ": ["a", "u0"], "oʊ": ["o", "u0"],
    "əʊ": ["o", "u0"], "ɪə": ["i", "a"], "eə": ["e", "a"], "ʊə": ["u", "a"], "tʃ": ["ch"], "dʒ": ["ll"],
    "i": ["i"], "ɪ": ["i"], "ᵻ": ["i"], "e": ["e"], "ɛ": ["e"], "æ": ["a"], "a": ["a"], "ɑ": ["a"], "ʌ": ["a"],
    "ɐ": ["a"], "ɒ": ["o"], "ɔ": ["o"], "o": ["o"], "ʊ": ["u"], "u": ["u"], "ə": ["e"], "ɜ": ["e"],
    "ɚ": ["e", "r"], "ɝ": ["e", "r"],
    "p": ["p"], "b": ["b"], "t": ["t"], "d": ["d"], "k": ["k"], "ɡ": ["g"], "g": ["g"], "f": ["f"], "v": ["b"],
    "s": ["s"], "z": ["s"], "m": ["m"], "n": ["n"], "l": ["l"], "θ": ["th"], "ð": ["d"], "ʃ": ["s"], "ʒ": ["ll"],
    "ŋ": ["n", "g"], "h": ["x"], "ɹ": ["r"], "r": ["r"], "ɾ": ["r"], "j": ["i0"], "w": ["u0"], "ʔ": ["t"],
    "x": ["x"],
}
# festival's British English phone set (mrpa) for espeak-ng's en-gb IPA
_MRPA = {
    "eɪ": ["ei"], "aɪ": ["ai"], "ɔɪ": ["oi"], "aʊ": ["au"], "əʊ": ["ou"], "oʊ": ["ou"], "eə": ["e@"],
    "ɪə": ["i@"], "ʊə": ["u@"], "tʃ": ["ch"], "dʒ": ["jh"], "iː": ["ii"], "uː": ["uu"], "ɔː": ["oo"],
    "ɑː": ["aa"], "ɜː": ["@@"],
    "i": ["i"], "ɪ": ["i"], "ᵻ": ["i"], "e": ["e"], "ɛ": ["e"], "æ": ["a"], "a": ["a"], "ɑ": ["aa"], "ʌ": ["uh"],
    "ɐ": ["@"], "ɒ": ["o"], "ɔ": ["oo"], "o": ["o"], "ʊ": ["u"], "u": ["uu"], "ə": ["@"], "ɜ": ["@@"],
    "ɚ": ["@"], "ɝ": ["@@"],
    "p": ["p"], "b": ["b"], "t": ["t"], "d": ["d"], "k": ["k"], "ɡ": ["g"], "g": ["g"], "f": ["f"], "v": ["v"],
    "s": ["s"], "z": ["z"], "m": ["m"], "n": ["n"], "l": ["l"], "θ": ["th"], "ð": ["dh"], "ʃ": ["sh"],
    "ʒ": ["zh"], "ŋ": ["ng"], "h": ["h"], "ɹ": ["r"], "r": ["r"], "ɾ": ["t"], "j": ["y"], "w": ["w"],
    "ʔ": ["t"], "x": ["k"],
}
_TABLES = {"italian": _ITALIAN, "spanish": _SPANISH, "mrpa": _MRPA}
_NUCLEI = {"italian": set("ieEaoOu"), "spanish": set("ieaou"),  # syllable nuclei (not i0 / u0, j / w)
           "mrpa": {"uh", "e", "a", "o", "i", "u", "ii", "uu", "oo", "aa", "@@", "ai", "ei", "oi", "au", "ou",
                    "e@", "i@", "u@", "@"}}
_ACCENTED_VOWELS = {"italian", "spanish"}  # phone sets with a stressed vowel of its own (a1); mrpa has none
_IGNORED = set("ː\u0329\u0306ˑ-‿")  # length, syllabic and other marks


def festival_word(word: str) -> str:
    """``word`` as festival reads it (and as the lexicon lists it)."""
    return word.replace("'", "")


def phones(ipa: str, language: str) -> list[tuple[str, bool]]:
    """``(phone, stressed)`` for an espeak-ng IPA word: each phone of ``language``'s set, with
    the primary stress (ˈ) carried to the next syllable nucleus."""
    table = _TABLES[language]
    out: list[tuple[str, bool]] = []
    stress, i = False, 0
    while i < len(ipa):
        ch = ipa[i]
        if ch == "ˈ":
            stress, i = True, i + 1
            continue
        if ch in _IGNORED or ch == "ˌ" or ch.isspace():
            i += 1
            continue
        for length in (2, 1):
            symbol = ipa[i:i + length]
            if symbol in table:
                for phone in table[symbol]:
                    nucleus = phone in _NUCLEI[language]
                    out.append((phone, stress and nucleus))
                    stress = stress and not nucleus
                i += length
                break
        else:
            raise ValueError(f"no {language} phone for IPA {ch!r} in {ipa!r}")
    return out


def syllables(word_phones: list[tuple[str, bool]], language: str) -> list[tuple[list[str], int]]:
    """Festival's syllable list ``[(phones, stress)]``: one nucleus each; of the consonants
    between two nuclei the first closes the earlier syllable when there are two or more.
    A stressed nucleus takes the phone set's accented vowel (``a`` -> ``a1``)."""
    nuclei = [k for k, (p, _) in enumerate(word_phones) if p in _NUCLEI[language]]
    if not nuclei:
        return [([p for p, _ in word_phones], 0)]
    bounds = [0]
    for a, b in zip(nuclei, nuclei[1:]):
        between = b - a - 1
        bounds.append(a + 1 + (1 if between >= 2 else 0))
    bounds.append(len(word_phones))
    out = []
    accent = language in _ACCENTED_VOWELS
    for start, end in zip(bounds, bounds[1:]):
        part = word_phones[start:end]
        stressed = any(s for _, s in part)
        out.append(([p + "1" if s and accent else p for p, s in part], int(stressed)))
    return out


# words whose pronunciation alone (a letter name, a stressed form) is not how sentences say them
_WEAK_FORMS = {"a": "ə"}


def ipa_words(words: list[str], accent: str = "en-us") -> dict[str, str]:
    """espeak-ng's IPA for each word, one espeak-ng call for all (one word per line)."""
    result = subprocess.run(["espeak-ng", "-q", "--ipa", "-v", accent], input="\n".join(words), check=True,
                            capture_output=True, text=True).stdout.split("\n")
    lines = [line.strip() for line in result if line.strip()]
    if len(lines) != len(words):
        raise RuntimeError(f"espeak-ng returned {len(lines)} lines for {len(words)} words")
    return {word: _WEAK_FORMS.get(word, ipa) for word, ipa in zip(words, lines)}


def prelude_scheme(voice: str) -> str:
    """Festival commands to run before selecting ``voice``: for the British voices, an empty
    MRPA lexicon named ``oald`` that the voice then selects instead of loading OALD."""
    if VOICES[voice] != "mrpa":
        return ""
    return ('(define (setup_oald_lex) (if (not (member_string "oald" (lex.list))) (begin (lex.create "oald") '
            "(lex.set.phoneset \"mrpa\") (lex.set.lts.method 'error))))\n")


def lexicon_scheme(voice: str, words: list[str]) -> str:
    """Festival commands adding every word of ``words`` to ``voice``'s lexicon (load them after
    selecting the voice)."""
    language = VOICES[voice]
    entries = []
    for word, ipa in ipa_words(words, _ESPEAK_ACCENT[language]).items():
        sylls = " ".join(f"(({' '.join(p)}) {s})" for p, s in syllables(phones(ipa, language), language) if p)
        entries.append(f'(lex.add.entry \'("{festival_word(word)}" nil ({sylls})))')
    return "\n".join(entries) + "\n"
