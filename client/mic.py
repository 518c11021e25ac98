"""``asr-mic``: stream the microphone to an asr.v1 server and print live transcripts.

The interim transcript updates one line; final results get their own lines.
Ctrl-C stops recording, half-closes the stream and prints the last final
result (a second Ctrl-C quits at once). Audio is captured as 16 kHz mono
through PortAudio (``sounddevice``; a device that refuses 16 kHz is recorded
at its own rate and the server resamples). ``--list-devices`` shows the input
devices, ``--device`` picks one by index or by part of its name.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import grpc

from asr.v1 import asr_pb2_grpc
from client.connection import add_connection_args, connection_from_args, parse_args
from client.capture import Capture, CaptureError, SoundDeviceCapture, input_devices
from client.cli import Printer, add_recognition_args
from client.stream import StreamOptions, channel, decoding_method, stream_chunks


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asr-mic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", default="localhost:50051", help="server address HOST:PORT (default: %(default)s)")
    p.add_argument("--list-devices", action="store_true", help="list the audio input devices and exit")
    p.add_argument("--device", help="input device: index or part of its name (default: the system's default)")
    add_recognition_args(p, end="when you stop")
    add_connection_args(p)
    return p


def stream_options(args: argparse.Namespace) -> StreamOptions:
    method = decoding_method(args.greedy, args.beam)
    return StreamOptions(interim_results=True, decoding_method=method, beam_width=args.beam,
                         endpointing=not args.no_endpointing, request_id=args.request_id)


def list_devices(out=None) -> None:
    out = out or sys.stdout
    devices = input_devices()
    if not devices:
        print("no audio input devices found", file=out)
        return
    print("audio input devices (* = default):", file=out)
    for d in devices:
        print(f"{'*' if d.is_default else ' '} {d.index:3d}  {d.name}  ({d.channels} ch, {d.default_rate:g} Hz)",
              file=out)


async def run(args: argparse.Namespace, capture: Capture, out=None, err=None) -> int:
    """Stream ``capture`` until it ends or Ctrl-C; print results. Returns the exit code."""
    out, err = out or sys.stdout, err or sys.stderr
    printer = Printer(out, show_timing=args.timing)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    stopping = False

    def on_interrupt() -> None:
        nonlocal stopping
        if stopping:
            task.cancel()
            return
        stopping = True
        print("\nstopping: waiting for the last result (Ctrl-C again to quit)", file=err, flush=True)
        capture.stop()

    try:
        loop.add_signal_handler(signal.SIGINT, on_interrupt)
        handler = True
    except (NotImplementedError, RuntimeError):  # no loop signal handlers here: Ctrl-C quits at once
        handler = False
    try:
        async with channel(getattr(args, "connection", None) or connection_from_args(args)) as ch:
            stub = asr_pb2_grpc.SpeechRecognitionStub(ch)
            capture.start()
            try:
                async for event in stream_chunks(stub, capture.blocks(), capture.sample_rate, stream_options(args)):
                    for result in event.response.results:
                        printer.result(result)
            finally:
                capture.stop()
    except CaptureError as exc:
        print(f"asr-mic: {exc}", file=err)
        return 2
    except grpc.aio.AioRpcError as exc:
        printer.close()
        hint = f" (is the server running at {args.server}?)" if exc.code() == grpc.StatusCode.UNAVAILABLE else ""
        print(f"asr-mic: {exc.code().name}: {exc.details()}{hint}", file=err)
        return 1
    except asyncio.CancelledError:
        printer.close()
        return 130
    finally:
        if handler:
            loop.remove_signal_handler(signal.SIGINT)
    printer.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    try:
        if args.list_devices:
            list_devices()
            return 0
        device = int(args.device) if args.device and args.device.isdigit() else args.device
        capture = SoundDeviceCapture(device)
    except CaptureError as exc:
        print(f"asr-mic: {exc}", file=sys.stderr)
        return 2
    print(f"listening on {capture.device_name!r} at {capture.sample_rate} Hz, streaming to {args.server}; "
          "Ctrl-C to stop", file=sys.stderr, flush=True)
    try:
        return asyncio.run(run(args, capture))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
