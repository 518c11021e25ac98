"""Token tables: token ids <-> text, and word boundaries for word timings.

Two kinds, one interface:

* ``CharTokenTable``: the demo model's characters (space, apostrophe, a-z) plus blank;
* ``SentencePieceTokenTable``: torchaudio's LibriSpeech BPE model (4096 pieces) plus blank.

In both, the blank is the last index, as torchaudio's ``RNNTBeamSearch`` expects.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

WORD_MARK = "\u2581"  # SentencePiece's word-start marker


@dataclass(frozen=True)
class Word:
    """A word with the encoder frames of its first and last token (40 ms per frame)."""

    text: str
    first_frame: int
    last_frame: int


class TokenTable(ABC):
    """Maps token ids (never the blank) to text."""

    @property
    @abstractmethod
    def size(self) -> int:
        """Number of output symbols, blank included."""

    @property
    def blank(self) -> int:
        return self.size - 1

    @abstractmethod
    def piece(self, token: int) -> str:
        """Surface text of one token; a word start is marked with a leading ``WORD_MARK``."""

    def text(self, tokens: list[int]) -> str:
        """Detokenised text with single spaces and no leading/trailing space."""
        return " ".join("".join(self.piece(t) for t in tokens).replace(WORD_MARK, " ").split())

    def words(self, tokens: list[int], frames: list[int]) -> list[Word]:
        """Group tokens into words; ``frames[i]`` is the encoder frame that emitted ``tokens[i]``."""
        words: list[Word] = []
        current, first, last = "", -1, -1
        for token, frame in zip(tokens, frames):
            piece = self.piece(token)
            starts = piece.startswith(WORD_MARK)
            piece = piece.replace(WORD_MARK, " ")
            for i, part in enumerate(piece.split(" ")):
                if (i > 0 or starts) and current:
                    words.append(Word(current, first, last))
                    current = ""
                if part:
                    if not current:
                        first = frame
                    current += part
                    last = frame
        if current:
            words.append(Word(current, first, last))
        return words


class CharTokenTable(TokenTable):
    """Characters; ``tokens.txt`` has one token per line, ``<space>`` for the space, ``<blank>`` last."""

    def __init__(self, symbols: list[str]):
        if not symbols or symbols[-1] != "<blank>":
            raise ValueError("the last token must be <blank>")
        self.symbols = [" " if s == "<space>" else s for s in symbols]
        self._index = {s: i for i, s in enumerate(self.symbols[:-1])}

    @classmethod
    def default(cls) -> "CharTokenTable":
        return cls(["<space>", "'"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["<blank>"])

    @classmethod
    def load(cls, path: str | Path) -> "CharTokenTable":
        return cls(Path(path).read_text().splitlines())

    def save(self, path: str | Path) -> None:
        Path(path).write_text("\n".join("<space>" if s == " " else s for s in self.symbols) + "\n")

    @property
    def size(self) -> int:
        return len(self.symbols)

    def piece(self, token: int) -> str:
        s = self.symbols[token]
        return WORD_MARK if s == " " else s

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (lower-cased); characters outside the table raise ``ValueError``."""
        try:
            return [self._index[c] for c in " ".join(text.lower().split())]
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} is not in the token table") from None


class SentencePieceTokenTable(TokenTable):
    """A SentencePiece model's pieces plus a trailing blank (torchaudio's bundle layout)."""

    def __init__(self, model_path: str | Path):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
        hidden = {self.sp.unk_id(), self.sp.eos_id(), self.sp.pad_id(), self.sp.bos_id()}
        self._pieces = ["" if i in hidden else self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())]

    @property
    def size(self) -> int:
        return len(self._pieces) + 1

    def piece(self, token: int) -> str:
        return self._pieces[token]


class SyntheticTokenTable(TokenTable):
    """Made-up word pieces for random-weight models: every id renders as a short syllable."""

    _CONSONANTS = "bdfgklmnprstvz"
    _VOWELS = "aeiou"

    def __init__(self, size: int):
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    def piece(self, token: int) -> str:
        c = self._CONSONANTS[token % len(self._CONSONANTS)]
        v = self._VOWELS[(token // len(self._CONSONANTS)) % len(self._VOWELS)]
        return (WORD_MARK if token % 3 == 0 else "") + c + v
