"""Attacks on a server, run in a separate process (``python -m tests.attacks KIND --port P ...``)
so that the attacker's own memory and CPU do not count as the server's. Each prints one JSON
line when it ends: how its calls ended (status code name -> count) and its own figures.

Kinds (docs/operations.md, "Hostile clients"):

- ``unauth``: ``--clients`` callers re-open ``StreamingRecognize`` without a token, each
  writing ``--message-bytes`` audio messages until refused, for ``--seconds``;
- ``trickle``: ``--clients`` streams each send a valid config, then ``--bytes`` of audio every
  ``--interval`` seconds, for ``--seconds``;
- ``big``: ``--clients`` streams each send ``--messages`` LINEAR16 messages of
  ``--message-bytes`` at ``--rate`` Hz as fast as the server reads them, then half-close;
- ``firehose``: ``--clients`` streams each send ``--seconds`` of noise as fast as the server
  reads it (far ahead of real time), then half-close.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time

import grpc
import numpy as np

from asr.v1 import asr_pb2, asr_pb2_grpc


def config(rate: int = 16000) -> asr_pb2.StreamingRecognizeRequest:
    return asr_pb2.StreamingRecognizeRequest(streaming_config=asr_pb2.StreamingRecognitionConfig(
        config=asr_pb2.RecognitionConfig(encoding=asr_pb2.LINEAR16, sample_rate_hertz=rate,
                                         endpointing=asr_pb2.EndpointingConfig(disabled=True)),
        interim_results=True))


def audio(nbytes: int, seed: int = 0) -> asr_pb2.StreamingRecognizeRequest:
    noise = np.random.default_rng(seed).integers(-3000, 3000, nbytes // 2, dtype="<i2")
    return asr_pb2.StreamingRecognizeRequest(audio_content=noise.tobytes())


async def _call(stub, requests, metadata, outcomes: collections.Counter) -> None:
    """One StreamingRecognize with ``requests`` (an async iterator); counts how it ended."""
    call = stub.StreamingRecognize(requests, metadata=metadata)
    try:
        async for _ in call:
            pass
        outcomes["OK"] += 1
    except grpc.aio.AioRpcError as exc:
        outcomes[exc.code().name] += 1


async def unauth(stub, args, outcomes) -> None:
    message = audio(args.message_bytes)
    until = time.monotonic() + args.seconds

    async def requests():
        yield config()
        while True:
            yield message

    async def caller():
        while time.monotonic() < until:
            await _call(stub, requests(), None, outcomes)

    await asyncio.gather(*(caller() for _ in range(args.clients)))


async def trickle(stub, args, outcomes) -> None:
    until = time.monotonic() + args.seconds

    async def requests():
        yield config()
        while time.monotonic() < until:
            yield asr_pb2.StreamingRecognizeRequest(audio_content=bytes(args.bytes))
            await asyncio.sleep(args.interval)

    await asyncio.gather(*(_call(stub, requests(), args.metadata, outcomes) for _ in range(args.clients)))


async def big(stub, args, outcomes) -> None:
    message = audio(args.message_bytes)

    async def requests():
        yield config(args.rate)
        for _ in range(args.messages):
            yield message

    await asyncio.gather(*(_call(stub, requests(), args.metadata, outcomes) for _ in range(args.clients)))


async def firehose(stub, args, outcomes) -> None:
    chunk = 5120  # 160 ms at 16 kHz

    async def requests(seed):
        yield config()
        for i in range(int(args.seconds * 32000 / chunk)):
            yield audio(chunk, seed * 100000 + i)

    await asyncio.gather(*(_call(stub, requests(n), args.metadata, outcomes) for n in range(args.clients)))


async def main(args) -> dict:
    outcomes: collections.Counter = collections.Counter()
    options = [("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{args.port}", options=options) as channel:
        stub = asr_pb2_grpc.SpeechRecognitionStub(channel)
        start = time.monotonic()
        await {"unauth": unauth, "trickle": trickle, "big": big, "firehose": firehose}[args.kind](stub, args, outcomes)
        return {"outcomes": dict(outcomes), "seconds": time.monotonic() - start}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.attacks")
    p.add_argument("kind", choices=["unauth", "trickle", "big", "firehose"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--token", default="", help="bearer token for the attacker's streams (not for unauth)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--message-bytes", type=int, default=1 << 20)
    p.add_argument("--messages", type=int, default=3)
    p.add_argument("--rate", type=int, default=8000)
    p.add_argument("--bytes", type=int, default=2)
    p.add_argument("--interval", type=float, default=1.0)
    args = p.parse_args(argv)
    args.metadata = (("authorization", f"Bearer {args.token}"),) if args.token else None
    return args


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(parse()))), flush=True)
