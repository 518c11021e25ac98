"""``asr-eval``: word error rate of a server on a manifest, through the real gRPC path.

Streams every utterance of a manifest (JSON lines with ``audio`` and ``text``, paths
relative to the manifest, or a directory of ``NAME.wav`` + ``NAME.txt``) to a
server as fast as possible, several streams at a time, and reports WER with
substitutions / deletions / insertions (jiwer), a per-utterance table and, with
``--json``, all of it as JSON. ``--spawn ARGS`` starts its own ``asr-server ARGS``.
``--group-by FIELD`` adds the WER per value of a manifest field (for example
``voice``: one line per speaker).

    asr-eval data/demo/test.jsonl --spawn "--model demo" --beam 4 --group-by voice
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import jiwer
import soundfile
from tqdm import tqdm

from asr.v1 import asr_pb2_grpc
from client.connection import Connection, add_connection_args, parse_args
from client.cli import read_wav
from client.spawn import spawned_server
from client.stream import StreamOptions, channel, decoding_method, stream_audio


@dataclass
class Utterance:
    audio: Path
    text: str
    group: str | None = None  # the manifest's --group-by field


@dataclass
class Scored:
    audio: str
    reference: str
    hypothesis: str
    wer: float
    seconds: float
    group: str | None = None


def load_manifest(path: Path, limit: int = 0, group_by: str | None = None) -> list[Utterance]:
    """The manifest's utterances; ``group_by`` names a JSON field every row must have."""
    if path.is_dir():
        if group_by:
            raise ValueError(f"--group-by needs a JSON-lines manifest, not the directory {path}")
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
                                       str(row[group_by]) if group_by else None))
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
                   progress: bool = True) -> dict:
    results: list[Scored | None] = [None] * len(utterances)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(utterances)):
        queue.put_nowait(i)
    bar = tqdm(total=len(utterances), desc="evaluating", unit="utt", disable=not progress, file=sys.stderr)
    start = time.monotonic()
    async with channel(address) as ch:
        stub = asr_pb2_grpc.SpeechRecognitionStub(ch)

        async def worker():
            while not queue.empty():
                i = queue.get_nowait()
                utt = utterances[i]
                hyp = normalise(await transcribe(stub, utt, options))
                ref = normalise(utt.text)
                results[i] = Scored(str(utt.audio), ref, hyp, jiwer.wer(ref, hyp) if ref else float(bool(hyp)),
                                    soundfile.info(str(utt.audio)).duration, utt.group)
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
    return {
        "utterances": len(scored), "words": measures.hits + measures.substitutions + measures.deletions,
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
    add_connection_args(p)
    return p


def report(results: dict, show: int) -> str:
    lines = [f"WER {results['wer'] * 100:.2f}%  ({results['substitutions']} substitutions, "
             f"{results['deletions']} deletions, {results['insertions']} insertions in {results['words']} words; "
             f"{results['utterances']} utterances, sentence error rate {results['sentence_error_rate'] * 100:.1f}%)",
             f"{results['audio_seconds']:.0f} s of audio in {results['wall_seconds']:.1f} s "
             f"({results['speed_vs_real_time']}x real time)"]
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
    try:
        utterances = load_manifest(args.manifest, args.limit, args.group_by)
    except (ValueError, KeyError, json.JSONDecodeError) as exc:
        print(f"asr-eval: {exc}", file=sys.stderr)
        return 2
    if not utterances:
        print(f"asr-eval: no utterances in {args.manifest}", file=sys.stderr)
        return 2
    method = decoding_method(args.greedy, args.beam)
    options = StreamOptions(realtime=False, interim_results=False, decoding_method=method, beam_width=args.beam,
                            endpointing=False)
    try:
        if args.spawn is not None:
            # its own server sheds no load: it serves the evaluation's streams as fast as it can
            # (an explicit --latency-budget-ms in ARGS still wins)
            with spawned_server(*shlex.split(args.spawn), env={"ASR_LATENCY_BUDGET_MS": "0"}) as (address, _):
                results = asyncio.run(evaluate(address, utterances, options, args.concurrency))
        else:
            results = asyncio.run(evaluate(args.connection, utterances, options, args.concurrency))
    except grpc.RpcError as exc:
        print(f"asr-eval: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(json.dumps(results, indent=2) if args.json else report(results, args.show))
    return 0


if __name__ == "__main__":
    sys.exit(main())
