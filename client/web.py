"""``asr-web``: a browser page that streams the microphone to an asr.v1 server.

Serves a small static page (``client/web/``) and a WebSocket bridge at ``/ws``.
The bridge is a thin client of the gRPC API, like ``asr-client``: one
``StreamingRecognize`` call per WebSocket, the browser's audio forwarded as it
comes, every result sent back as JSON with the server's timing. Nothing is
recognised here. Browsers give pages the microphone only on ``localhost`` or
over HTTPS: to serve other machines, pass ``--tls-cert`` and ``--tls-key``.

WebSocket protocol, one recognition stream per connection:

* browser -> bridge: a JSON text message first (``{"sample_rate": 16000}``,
  optionally ``"beam": N``, ``"endpointing": false``), then binary LINEAR16
  mono messages, then the text message ``end`` (half-close: the last final
  result follows);
* bridge -> browser: ``{"type": "ready", "model": ...}``, one
  ``{"type": "result", ...}`` per result, then ``{"type": "end"}`` or
  ``{"type": "error", "code": ..., "message": ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import ssl
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import soundfile
from aiohttp import WSMsgType, web

from asr.v1 import asr_pb2, asr_pb2_grpc
from client.connection import Connection, add_connection_args, parse_args
from client.stream import StreamOptions, channel, stream_chunks

STATIC = Path(__file__).resolve().parent / "web"
STUB = web.AppKey("stub", asr_pb2_grpc.SpeechRecognitionStub)
SAVE_DIR = web.AppKey("save_dir", object)
_session_ids = itertools.count(1)


def _seconds(duration) -> float:
    return round(duration.seconds + duration.nanos / 1e9, 3)


def result_message(result: asr_pb2.StreamingRecognitionResult, bridge_latency_s: float | None) -> dict:
    """One result as the page sees it: text, finality, times, and where the time went."""
    alt = result.alternatives[0] if result.alternatives else None
    t = result.timing
    return {"type": "result", "transcript": alt.transcript if alt else "", "is_final": result.is_final,
            "stability": round(result.stability, 3), "confidence": round(alt.confidence, 3) if alt else 0.0,
            "utterance": result.utterance_index, "start_s": _seconds(result.result_start_time),
            "end_s": _seconds(result.result_end_time),
            "latency_ms": round(t.chunk_latency_ms, 1), "queue_wait_ms": round(t.queue_wait_ms, 1),
            "compute_ms": round(t.compute_ms, 1), "batch_size": t.batch_size,
            "bridge_latency_ms": None if bridge_latency_s is None else round(bridge_latency_s * 1000, 1)}


def stream_options(config: dict) -> StreamOptions:
    beam = int(config.get("beam") or 0)
    return StreamOptions(interim_results=True, endpointing=bool(config.get("endpointing", True)),
                         decoding_method=asr_pb2.BEAM_SEARCH if beam else asr_pb2.DECODING_METHOD_UNSPECIFIED,
                         beam_width=beam, request_id=str(config.get("request_id", "")))


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=30)
    await ws.prepare(request)
    stub = request.app[STUB]
    first = await ws.receive()
    try:
        config = json.loads(first.data) if first.type == WSMsgType.TEXT else None
        rate = int(config["sample_rate"])
    except (ValueError, TypeError, KeyError):
        if not ws.closed:
            await ws.send_json({"type": "error", "code": "INVALID_ARGUMENT",
                                "message": 'the first message must be a JSON config such as {"sample_rate": 16000}'})
            await ws.close()
        return ws
    audio = bytearray()

    async def chunks():
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                audio.extend(msg.data)
                yield msg.data
            elif msg.type == WSMsgType.TEXT and msg.data == "end":
                return

    try:
        info = await stub.GetModelInfo(asr_pb2.GetModelInfoRequest())
        await ws.send_json({"type": "ready", "model": info.model_name})
        async for event in stream_chunks(stub, chunks(), rate, stream_options(config)):
            if ws.closed:  # the browser went away: leaving stream_chunks cancels the call
                break
            for result in event.response.results:
                await ws.send_json(result_message(result, event.client_latency_s))
        else:
            await ws.send_json({"type": "end"})
    except grpc.aio.AioRpcError as exc:
        if not ws.closed:
            await ws.send_json({"type": "error", "code": exc.code().name, "message": exc.details()})
    except ConnectionResetError:  # the browser went away while we were sending
        pass
    finally:
        await ws.close()
        save_dir = request.app[SAVE_DIR]
        if save_dir and audio:
            name = f"{time.strftime('%Y%m%d-%H%M%S')}-{next(_session_ids)}.wav"
            soundfile.write(str(save_dir / name), np.frombuffer(bytes(audio[:len(audio) // 2 * 2]), "<i2"), rate,
                            subtype="PCM_16")
    return ws


def create_app(server: str | Connection, save_audio: Path | None = None) -> web.Application:
    """The page and the bridge to the gRPC server ``server`` (HOST:PORT, or a ``Connection``)."""
    app = web.Application()
    app[SAVE_DIR] = save_audio
    if save_audio:
        save_audio.mkdir(parents=True, exist_ok=True)

    async def grpc_channel(app: web.Application):
        async with channel(server) as ch:
            app[STUB] = asr_pb2_grpc.SpeechRecognitionStub(ch)
            yield

    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    app.cleanup_ctx.append(grpc_channel)
    app.router.add_get("/", index)
    app.router.add_get("/ws", websocket)
    app.router.add_static("/static", STATIC)
    return app


async def start(app: web.Application, host: str = "127.0.0.1", port: int = 0,
                ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    """Serve ``app``; returns the runner (``await runner.cleanup()`` stops it) and the bound port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    return runner, runner.addresses[0][1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asr-web", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", default="localhost:50051", help="gRPC server HOST:PORT (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address the page is served on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="HTTP port, 0 picks a free one (default: %(default)s)")
    p.add_argument("--tls-cert", type=Path, help="certificate (PEM) to serve HTTPS, needed beyond localhost")
    p.add_argument("--tls-key", type=Path, help="private key (PEM) of --tls-cert")
    p.add_argument("--save-audio", type=Path, metavar="DIR",
                   help="save each session's audio as a WAV in DIR (asr-client FILE gives the same finals)")
    add_connection_args(p, prefix="grpc-")
    return p


async def serve(args: argparse.Namespace) -> None:
    context = None
    if args.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.tls_cert, args.tls_key)
    runner, port = await start(create_app(args.connection, args.save_audio), args.host, args.port, context)
    scheme = "https" if context else "http"
    print(f"asr-web: open {scheme}://{args.host}:{port}/ (gRPC server {args.server})", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv, prefix="grpc-")
    if bool(args.tls_cert) != bool(args.tls_key):
        print("asr-web: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"asr-web: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
