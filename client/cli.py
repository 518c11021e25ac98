"""``asr-client``: stream a WAV file to an asr.v1 server and print the transcript.

Interim results update one line (on a terminal), final results get their own
lines; ``--json`` prints one JSON object per response instead. The audio is
sent as it is in the file (any sample rate, mono or multi-channel): the server
resamples and downmixes. Exits non-zero with the server's status on errors.
A stream that fails with UNAVAILABLE before its first response (a server that
drains or went away) starts again, up to ``--retries`` times: on a ``--server``
that names several servers, on another one. ``--resume`` also goes on with a
stream cut mid-way (its server died or drained past its timeout): a new stream,
the audio since the last final result sent again (at most ``--resume-keep-s``),
and the results' times shifted so that they read as one stream
(``client.stream.Resume``, docs/scaling.md).
``--phrase TEXT`` (repeatable), ``--phrases-file FILE`` and ``--boost X`` name
phrases the server favours in decoding (contextual biasing, docs/biasing.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import grpc
import soundfile
from google.protobuf import json_format

from asr.v1 import asr_pb2, asr_pb2_grpc
from client.connection import add_connection_args, connection_from_args, parse_args
from client.phrases import PhraseError, add_phrase_args, check_with_server, phrases_from_args
from client.stream import Resume, Retry, StreamOptions, channel, decoding_method, pcm16, stream_audio


def read_wav(path: Path) -> tuple[bytes, int, int]:
    """LINEAR16 bytes (interleaved), sample rate and channel count of an audio file in any format
    soundfile reads (16/24/32-bit and 8-bit integer, float and double, A-law and mu-law WAV, FLAC,
    ...): decoded to float in [-1, 1] (libsndfile's own scaling of each format; float samples as
    they are), then rounded to int16, so a 16-bit file's samples come back unchanged.
    ``FileNotFoundError`` for a missing file (libsndfile says only "System error")."""
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    return pcm16(data), rate, data.shape[1]


class Printer:
    """Interim results on one updating line (terminal) or as changed lines; finals on their own."""

    def __init__(self, out=sys.stdout, show_timing: bool = False):
        self.out = out
        self.tty = out.isatty()
        self.show_timing = show_timing
        self.last_interim = ""

    def result(self, result: asr_pb2.StreamingRecognitionResult) -> None:
        text = result.alternatives[0].transcript if result.alternatives else ""
        timing = ""
        if self.show_timing:
            timing = f"  [{result.timing.chunk_latency_ms:.0f} ms]"
        if result.is_final:
            if self.tty:
                self.out.write("\r\033[K")
            self.out.write(f"{text}{timing}\n")
            self.last_interim = ""
        elif text != self.last_interim:
            if self.tty:
                self.out.write(f"\r\033[K{text} …{timing}")
            else:
                self.out.write(f"… {text}{timing}\n")
            self.last_interim = text
        self.out.flush()

    def close(self) -> None:
        if self.tty and self.last_interim:
            self.out.write("\n")


def positive(kind):
    """An argparse type: ``kind`` (int or float) parsed from the text, more than 0."""
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
        return value
    return parse


def non_negative(kind):
    """An argparse type: ``kind`` (int or float) parsed from the text, 0 or more."""
    def parse(text: str):
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
        return value
    return parse


def add_recognition_args(p: argparse.ArgumentParser, end: str) -> None:
    """The decoding and reporting options asr-client and asr-mic share; ``end`` says when the one
    final result of --no-endpointing comes."""
    p.add_argument("--beam", type=int, default=0, metavar="N",
                   help="beam search with N hypotheses (default: the server's decoding method)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding")
    p.add_argument("--no-endpointing", action="store_true", help=f"one final result {end}")
    p.add_argument("--timing", action="store_true", help="show the server's chunk latency next to results")
    p.add_argument("--request-id", default="", help="request id echoed in responses and server logs")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asr-client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", type=Path, help="audio file to stream (WAV, FLAC, ...; any rate, mono or multi-channel)")
    p.add_argument("--server", default="localhost:50051", help="server address HOST:PORT (default: %(default)s)")
    p.add_argument("--fast", action="store_true", help="send as fast as possible instead of in real time")
    p.add_argument("--json", action="store_true", help="print one JSON object per response")
    add_recognition_args(p, end="at the end of the stream")
    p.add_argument("--no-interim", action="store_true", help="final results only")
    p.add_argument("--words", action="store_true", help="ask for word time offsets (shown with --json)")
    p.add_argument("--chunk-ms", type=int, default=160, help="audio per message (default: %(default)s)")
    p.add_argument("--retries", type=non_negative(int), default=Retry().attempts, metavar="N",
                   help="start the stream again up to N times when it fails with UNAVAILABLE before its first "
                        "response (0: never; default %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="go on with a stream cut mid-way (UNAVAILABLE, CANCELLED, INTERNAL) on a new stream, sending "
                        "the audio since the last final result again")
    p.add_argument("--resume-keep-s", type=positive(float), default=Resume().keep_s, metavar="S",
                   help="with --resume: the most audio since the last final result kept to send again; a cut with "
                        "more is not resumed (default %(default)s)")
    add_phrase_args(p)
    add_connection_args(p)
    return p


async def run(args: argparse.Namespace) -> int:
    try:
        phrases = phrases_from_args(args)
    except PhraseError as exc:
        print(f"asr-client: {exc}", file=sys.stderr)
        return 2
    try:
        pcm, rate, channels = read_wav(args.file)
    except FileNotFoundError as exc:
        print(f"asr-client: {exc}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError, soundfile.LibsndfileError) as exc:
        print(f"asr-client: cannot read {args.file}: {exc}", file=sys.stderr)
        return 2
    method = decoding_method(args.greedy, args.beam)
    options = StreamOptions(interim_results=not args.no_interim, decoding_method=method, beam_width=args.beam,
                            word_time_offsets=args.words, endpointing=not args.no_endpointing,
                            request_id=args.request_id, realtime=not args.fast, chunk_ms=args.chunk_ms,
                            phrases=phrases.phrases, boost=phrases.boost)
    printer = Printer(show_timing=args.timing)

    def retrying(error: grpc.aio.AioRpcError, attempt: int) -> None:
        print(f"asr-client: {error.code().name}: {error.details()}; trying again ({attempt} of {args.retries})",
              file=sys.stderr, flush=True)

    def resuming(error: grpc.aio.AioRpcError, from_s: float, attempt: int) -> None:
        print(f"asr-client: {error.code().name}: {error.details()}; going on with a new stream from "
              f"{from_s:.2f} s ({attempt} of {resume.attempts})", file=sys.stderr, flush=True)

    resume = Resume(keep_s=args.resume_keep_s, attempts=max(args.retries, 1)) if args.resume else None
    async with channel(getattr(args, "connection", None) or connection_from_args(args)) as ch:
        stub = asr_pb2_grpc.SpeechRecognitionStub(ch)
        try:
            await check_with_server(ch, phrases)
        except PhraseError as exc:
            print(f"asr-client: {exc}", file=sys.stderr)
            return 2
        try:
            async for event in stream_audio(stub, pcm, rate, options, channels=channels,
                                            retry=Retry(attempts=args.retries), on_retry=retrying,
                                            resume=resume, on_resume=resuming):
                if args.json:
                    doc = json_format.MessageToDict(event.response, preserving_proto_field_name=True)
                    if event.client_latency_s is not None:
                        doc["client_latency_ms"] = round(event.client_latency_s * 1000, 1)
                    print(json.dumps(doc), flush=True)
                else:
                    for result in event.response.results:
                        printer.result(result)
        except grpc.aio.AioRpcError as exc:
            printer.close()
            print(f"asr-client: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    printer.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
