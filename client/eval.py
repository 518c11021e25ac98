"""``asr-eval``: word error rate of a server on a manifest, through the real gRPC path.

Streams every utterance of a manifest (JSON lines with ``audio`` and ``text``, paths
relative to the manifest, or a directory of ``NAME.wav`` + ``NAME.txt``) to a
server as fast as possible, several streams at a time, and reports WER with
substitutions / deletions / insertions (jiwer), a per-utterance table and, with
``--json``, all of it as JSON. ``--spawn ARGS`` starts its own ``asr-server ARGS``.

    asr-eval data/demo/test.jsonl --spawn "--model demo" --beam 4
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


@dataclass
class Scored:
    audio: str
    reference: str
    hypothesis: str
    wer: float
    seconds: float


def load_manifest(path: Path, limit: int = 0) -> list[Utterance]:
    if path.is_dir():
        items = [Utterance(w, w.with_suffix(".txt").read_text().strip()) for w in sorted(path.glob("*.wav"))
                 if w.with_suffix(".txt").exists()]
    else:
        items = []
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                items.append(Utterance(path.parent / row["audio"], row["text"]))
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
                                    soundfile.info(str(utt.audio)).duration)
                bar.update()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    bar.close()
    wall = time.monotonic() - start
    scored = [r for r in results if r is not None]
    measures = jiwer.process_words([r.reference for r in scored], [r.hypothesis or "" for r in scored])
    audio_seconds = sum(r.seconds for r in scored)
    return {
        "utterances": len(scored), "words": measures.hits + measures.substitutions + measures.deletions,
        "wer": measures.wer, "substitutions": measures.substitutions, "deletions": measures.deletions,
        "insertions": measures.insertions, "sentence_error_rate": sum(r.wer > 0 for r in scored) / len(scored),
        "audio_seconds": round(audio_seconds, 2), "wall_seconds": round(wall, 2),
        "speed_vs_real_time": round(audio_seconds / wall, 2) if wall else None,
        "per_utterance": [asdict(r) for r in scored],
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
    add_connection_args(p)
    return p


def report(results: dict, show: int) -> str:
    lines = [f"WER {results['wer'] * 100:.2f}%  ({results['substitutions']} substitutions, "
             f"{results['deletions']} deletions, {results['insertions']} insertions in {results['words']} words; "
             f"{results['utterances']} utterances, sentence error rate {results['sentence_error_rate'] * 100:.1f}%)",
             f"{results['audio_seconds']:.0f} s of audio in {results['wall_seconds']:.1f} s "
             f"({results['speed_vs_real_time']}x real time)"]
    errors = [r for r in results["per_utterance"] if r["wer"] > 0][:show]
    if errors:
        lines.append(f"\n{'WER':>6}  reference / hypothesis")
        for r in errors:
            lines.append(f"{r['wer'] * 100:5.1f}%  {r['reference']}\n{'':8}{r['hypothesis']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    utterances = load_manifest(args.manifest, args.limit)
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
