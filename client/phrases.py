"""Contextual-biasing options shared by the clients: ``--phrase``, ``--phrases-file``, ``--boost``.

A request may name phrases the audio is likely to contain (names, places, product terms); the server
favours them in decoding (``RecognitionConfig.speech_contexts``, docs/biasing.md). The clients check
what they can before sending: a phrase must hold some text and no line breaks or control characters,
``--boost`` needs phrases, and, once the server's ``GetModelInfo`` is known, the phrase count, the
characters per phrase and the boost must lie within the limits it reports. Each check fails with a
message that names the phrase (or the file and line) and the limit.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import grpc

from asr.v1 import asr_pb2, asr_pb2_grpc


class PhraseError(ValueError):
    """A phrase option a client refuses before sending anything."""


@dataclass(frozen=True)
class Phrases:
    phrases: tuple[str, ...] = ()
    boost: float = 0.0  # 0: the server's default boost

    def __bool__(self) -> bool:
        return bool(self.phrases)


def add_phrase_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("contextual biasing")
    g.add_argument("--phrase", action="append", default=[], metavar="TEXT",
                   help="a phrase the audio is likely to contain (a name, place, product term), favoured in "
                        "decoding; repeat for more")
    g.add_argument("--phrases-file", type=Path, metavar="FILE",
                   help="phrases, one per line (blank lines are skipped), added to any --phrase")
    g.add_argument("--boost", type=float, default=0.0, metavar="X",
                   help="bonus per token of a phrase, in log-probability units (default 0: the server's "
                        "default, GetModelInfo's limits.default_boost)")


def clean(phrase: str, where: str) -> str:
    """``phrase`` with its spaces collapsed; ``PhraseError`` naming ``where`` if it is empty or holds
    a line break or another control character."""
    if any(ord(c) < 32 or ord(c) == 127 for c in phrase.replace("\t", " ")):
        raise PhraseError(f"{where}: the phrase {phrase!r} holds a line break or control character")
    text = " ".join(phrase.split())
    if not text:
        raise PhraseError(f"{where}: empty phrase")
    return text


def read_phrases_file(path: Path) -> list[str]:
    """The phrases of ``path``, one per line; blank lines are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise PhraseError(f"--phrases-file: no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PhraseError(f"--phrases-file: cannot read {path}: {exc}") from None
    return [clean(line, f"{path} line {n}") for n, line in enumerate(lines, 1) if line.strip()]


def phrases_from_args(args: argparse.Namespace, boost_alone: bool = False) -> Phrases:
    """The ``--phrase`` / ``--phrases-file`` / ``--boost`` options, checked; ``PhraseError`` if wrong.
    ``boost_alone``: a boost without phrases is allowed (phrases come from elsewhere)."""
    phrases = [clean(text, "--phrase") for text in args.phrase]
    if args.phrases_file is not None:
        from_file = read_phrases_file(args.phrases_file)
        if not from_file:
            raise PhraseError(f"--phrases-file: {args.phrases_file} holds no phrase")
        phrases += from_file
    if not math.isfinite(args.boost):
        raise PhraseError(f"--boost: {args.boost} is not a number")
    if args.boost and not phrases and not boost_alone:
        raise PhraseError("--boost needs phrases (--phrase or --phrases-file)")
    return Phrases(tuple(phrases), args.boost)


def check_limits(phrases: Phrases, limits: asr_pb2.Limits) -> None:
    """``PhraseError`` naming the limit if ``phrases`` exceed the server's (``ModelInfo.limits``)."""
    if not phrases:
        return
    if limits.max_phrases == 0:
        raise PhraseError("the server takes no phrases (its GetModelInfo reports max_phrases 0)")
    if len(phrases.phrases) > limits.max_phrases:
        raise PhraseError(f"{len(phrases.phrases)} phrases: the server takes at most {limits.max_phrases} "
                          "per request (max_phrases)")
    for text in phrases.phrases:
        if len(text) > limits.max_phrase_chars:
            raise PhraseError(f"the phrase {text[:40]!r}{'...' if len(text) > 40 else ''} has {len(text)} "
                              f"characters: the server takes at most {limits.max_phrase_chars} (max_phrase_chars)")
    if phrases.boost and not limits.min_boost <= phrases.boost <= limits.max_boost:
        raise PhraseError(f"--boost {phrases.boost:g}: the server takes a boost in [{limits.min_boost:g}, "
                          f"{limits.max_boost:g}] (min_boost, max_boost), or 0 for its default "
                          f"({limits.default_boost:g})")


async def check_with_server(ch: grpc.aio.Channel, phrases: Phrases, timeout: float = 10.0) -> None:
    """``check_limits`` against the server's ``GetModelInfo`` (a no-op without phrases). A server that
    does not answer it is left to judge the request itself."""
    if not phrases:
        return
    try:
        info = await asr_pb2_grpc.SpeechRecognitionStub(ch).GetModelInfo(asr_pb2.GetModelInfoRequest(),
                                                                          timeout=timeout)
    except grpc.aio.AioRpcError:
        return
    check_limits(phrases, info.limits)
