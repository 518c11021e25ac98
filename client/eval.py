"""``asr-eval``: word error rate of a server on a manifest, through the real gRPC path.

Streams every utterance of a manifest (JSON lines with ``audio`` and ``text``, paths
relative to the manifest, or a directory of ``NAME.wav`` + ``NAME.txt``) to a
server as fast as possible, several streams at a time, and reports WER with
substitutions / deletions / insertions (jiwer), a per-utterance table and, with
``--json``, all of it as JSON. ``--spawn ARGS`` starts its own ``asr-server ARGS``.
``--group-by FIELD`` adds the WER per value of a manifest field (for example
``voice``: one line per speaker).

Contextual biasing (docs/biasing.md): ``--phrase TEXT`` (repeatable), ``--phrases-file FILE`` and
``--boost X`` send the same phrases with every utterance; ``--phrase-field FIELD`` names a manifest
field holding each utterance's own phrase (or list of phrases), whose recall (found whole in the
transcript) is reported, and ``--send-phrase-field`` also sends them with that utterance.

    asr-eval data/demo/test.jsonl --spawn "--model demo" --beam 4 --group-by voice
    asr-eval tests/data/bias-phrases/manifest.jsonl --spawn "--model demo" --phrase-field phrase --send-phrase-field
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import grpc
import jiwer
import soundfile
from tqdm import tqdm

from asr.v1 import asr_pb2_grpc
from client.connection import Connection, add_connection_args, parse_args
from client.cli import read_wav
from client.phrases import PhraseError, Phrases, add_phrase_args, check_with_server, clean, phrases_from_args
from client.spawn import spawned_server
from client.stream import StreamOptions, channel, decoding_method, stream_audio


@dataclass
class Utterance:
    audio: Path
    text: str
    group: str | None = None  # the manifest's --group-by field
    phrases: tuple[str, ...] = ()  # the manifest's --phrase-field: phrases this utterance contains


@dataclass
class Scored:
    audio: str
    reference: str
    hypothesis: str
    wer: float
    seconds: float
    group: str | None = None
    phrases: list[str] = field(default_factory=list)
    found: list[bool] = field(default_factory=list)  # per phrase: whether the hypothesis holds it whole


def _row_phrases(path: Path, row: dict, name: str, line: str) -> tuple[str, ...]:
    if name not in row:
        raise ValueError(f"{path}: a row has no field {name!r}: {line.strip()[:120]}")
    value = row[name]
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{path}: field {name!r} must be a string or a list of strings: {line.strip()[:120]}")
    try:
        return tuple(clean(v, f"{path}: field {name!r}") for v in values)
    except PhraseError as exc:
        raise ValueError(str(exc)) from None


def contains(hypothesis: str, phrase: str) -> bool:
    """Whether ``phrase`` occurs in ``hypothesis`` as whole words (both normalised)."""
    return f" {normalise(phrase)} " in f" {normalise(hypothesis)} "


def load_manifest(path: Path, limit: int = 0, group_by: str | None = None,
                  phrase_field: str | None = None) -> list[Utterance]:
    """The manifest's utterances; ``group_by`` and ``phrase_field`` name JSON fields every row must
    have (``phrase_field``: a phrase or a list of them)."""
    if path.is_dir():
        if group_by or phrase_field:
            raise ValueError(f"--group-by and --phrase-field need a JSON-lines manifest, not the directory {path}")
        items = [Utterance(w, w.with_suffix(".txt").read_text().strip()) for w in sorted(path.glob("*.wav"))
                 if w.with_suffix(".txt").exists()]
    else:
        items = []
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if group_by and group_by not in row:
                    raise ValueError(f"{path}: a row has no field {group_by!r}: {line.strip()[:120]}")
                items.append(Utterance(path.parent / row["audio"], row["text"],
                                       str(row[group_by]) if group_by else None,
                                       _row_phrases(path, row, phrase_field, line) if phrase_field else ()))
    return items[:limit] if limit else items


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


async def transcribe(stub, utt: Utterance, options: StreamOptions) -> str:
    pcm, rate, channels = read_wav(utt.audio)
    finals = []
    async for event in stream_audio(stub, pcm, rate, options, channels=channels):
        finals += [r.alternatives[0].transcript for r in event.response.results if r.is_final and r.alternatives]
    return " ".join(t for t in finals if t)


async def evaluate(address: str | Connection, utterances: list[Utterance], options: StreamOptions, concurrency: int,
                   progress: bool = True, send_utterance_phrases: bool = False) -> dict:
    """WER (and, where utterances name phrases, their recall) of ``utterances`` through the server at
    ``address``. ``options.phrases`` go with every utterance; ``send_utterance_phrases`` adds each
    utterance's own ``phrases`` to its request. ``PhraseError`` if the phrases exceed the server's limits."""
    results: list[Scored | None] = [None] * len(utterances)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(utterances)):
        queue.put_nowait(i)
    bar = tqdm(total=len(utterances), desc="evaluating", unit="utt", disable=not progress, file=sys.stderr)
    start = time.monotonic()
    async with channel(address) as ch:
        stub = asr_pb2_grpc.SpeechRecognitionStub(ch)
        await check_with_server(ch, Phrases(options.phrases, options.boost))

        async def worker():
            while not queue.empty():
                i = queue.get_nowait()
                utt = utterances[i]
                own = replace(options, phrases=options.phrases + utt.phrases) if send_utterance_phrases else options
                hyp = normalise(await transcribe(stub, utt, own))
                ref = normalise(utt.text)
                results[i] = Scored(str(utt.audio), ref, hyp, jiwer.wer(ref, hyp) if ref else float(bool(hyp)),
                                    soundfile.info(str(utt.audio)).duration, utt.group, list(utt.phrases),
                                    [contains(hyp, p) for p in utt.phrases])
                bar.update()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    bar.close()
    wall = time.monotonic() - start
    scored = [r for r in results if r is not None]
    measures = jiwer.process_words([r.reference for r in scored], [r.hypothesis or "" for r in scored])
    audio_seconds = sum(r.seconds for r in scored)
    groups = {}
    for name in sorted({r.group for r in scored if r.group is not None}):
        members = [r for r in scored if r.group == name]
        m = jiwer.process_words([r.reference for r in members], [r.hypothesis or "" for r in members])
        groups[name] = {"utterances": len(members), "words": m.hits + m.substitutions + m.deletions, "wer": m.wer}
    named = sum(len(r.phrases) for r in scored)
    found = sum(sum(r.found) for r in scored)
    recall = {"phrases": named, "found": found, "recall": found / named} if named else None
    return {
        "utterances": len(scored), "words": measures.hits + measures.substitutions + measures.deletions,
        "phrase_recall": recall,
        "wer": measures.wer, "substitutions": measures.substitutions, "deletions": measures.deletions,
        "insertions": measures.insertions, "sentence_error_rate": sum(r.wer > 0 for r in scored) / len(scored),
        "audio_seconds": round(audio_seconds, 2), "wall_seconds": round(wall, 2),
        "speed_vs_real_time": round(audio_seconds / wall, 2) if wall else None,
        "groups": groups, "per_utterance": [asdict(r) for r in scored],
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asr-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", type=Path, help="JSON-lines manifest (audio, text) or a directory of WAV + TXT")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--server", default="localhost:50051", help="server HOST:PORT (default: %(default)s)")
    where.add_argument("--spawn", metavar="ARGS", help="start 'asr-server ARGS' for the evaluation (without "
                       "load shedding: --latency-budget-ms 0 unless ARGS say otherwise)")
    p.add_argument("--beam", type=int, default=0, metavar="N", help="beam search with N hypotheses")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (default: the server's method)")
    p.add_argument("--limit", type=int, default=0, help="only the first N utterances")
    p.add_argument("--concurrency", type=int, default=8, help="streams at once (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--show", type=int, default=20, help="utterances with errors to list (default: %(default)s)")
    p.add_argument("--group-by", metavar="FIELD", help="also report WER per value of this manifest field "
                   "(for example voice)")
    add_phrase_args(p)
    p.add_argument("--phrase-field", metavar="FIELD",
                   help="manifest field with each utterance's phrase (or list of phrases): report their recall")
    p.add_argument("--send-phrase-field", action="store_true",
                   help="also send each utterance's --phrase-field phrases with it (with --boost)")
    add_connection_args(p)
    return p


def report(results: dict, show: int) -> str:
    lines = [f"WER {results['wer'] * 100:.2f}%  ({results['substitutions']} substitutions, "
             f"{results['deletions']} deletions, {results['insertions']} insertions in {results['words']} words; "
             f"{results['utterances']} utterances, sentence error rate {results['sentence_error_rate'] * 100:.1f}%)",
             f"{results['audio_seconds']:.0f} s of audio in {results['wall_seconds']:.1f} s "
             f"({results['speed_vs_real_time']}x real time)"]
    if results.get("phrase_recall"):
        r = results["phrase_recall"]
        lines.append(f"phrase recall {r['recall'] * 100:.1f}% ({r['found']} of {r['phrases']} phrases found whole)")
    if results["groups"]:
        width = max(len(name) for name in results["groups"])
        lines.append(f"\n{'group':<{width}}  utterances  words     WER")
        for name, g in results["groups"].items():
            lines.append(f"{name:<{width}}  {g['utterances']:>10}  {g['words']:>5}  {g['wer'] * 100:5.1f}%")
    errors = [r for r in results["per_utterance"] if r["wer"] > 0][:show]
    if errors:
        lines.append(f"\n{'WER':>6}  reference / hypothesis")
        for r in errors:
            lines.append(f"{r['wer'] * 100:5.1f}%  {r['reference']}\n{'':8}{r['hypothesis']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    if args.send_phrase_field and not args.phrase_field:
        print("asr-eval: --send-phrase-field needs --phrase-field", file=sys.stderr)
        return 2
    try:
        phrases = phrases_from_args(args, boost_alone=args.send_phrase_field)  # the boost of the manifest's
        utterances = load_manifest(args.manifest, args.limit, args.group_by, args.phrase_field)
    except (PhraseError, ValueError, KeyError, json.JSONDecodeError) as exc:
        print(f"asr-eval: {exc}", file=sys.stderr)
        return 2
    if not utterances:
        print(f"asr-eval: no utterances in {args.manifest}", file=sys.stderr)
        return 2
    method = decoding_method(args.greedy, args.beam)
    options = StreamOptions(realtime=False, interim_results=False, decoding_method=method, beam_width=args.beam,
                            endpointing=False, phrases=phrases.phrases, boost=phrases.boost)
    try:
        if args.spawn is not None:
            # its own server sheds no load: it serves the evaluation's streams as fast as it can
            # (an explicit --latency-budget-ms in ARGS still wins)
            with spawned_server(*shlex.split(args.spawn), env={"ASR_LATENCY_BUDGET_MS": "0"}) as (address, _):
                results = asyncio.run(evaluate(address, utterances, options, args.concurrency,
                                               send_utterance_phrases=args.send_phrase_field))
        else:
            results = asyncio.run(evaluate(args.connection, utterances, options, args.concurrency,
                                           send_utterance_phrases=args.send_phrase_field))
    except PhraseError as exc:
        print(f"asr-eval: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"asr-eval: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(json.dumps(results, indent=2) if args.json else report(results, args.show))
    return 0


if __name__ == "__main__":
    sys.exit(main())
