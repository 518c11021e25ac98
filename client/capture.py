"""Microphone capture behind a thin adapter: LINEAR16 mono blocks as an async iterator.

``Capture`` is all the microphone client needs from a device: ``sample_rate``,
``start()``, ``stop()`` and ``blocks()`` (LINEAR16 mono bytes, ending after
``stop()``). ``SoundDeviceCapture`` implements it with PortAudio through
``sounddevice``; tests drive the client with a fake. Whatever goes wrong at the
device layer (PortAudio missing, no input device, an unknown ``--device``)
surfaces as ``CaptureError`` with a message a user can act on.
"""

from __future__ import annotations

import asyncio
import importlib
from dataclasses import dataclass
from typing import AsyncIterator, Protocol

SAMPLE_RATE = 16000
BLOCK_MS = 160  # one model chunk per message
PORTAUDIO_HINT = ("install PortAudio: 'sudo apt-get install libportaudio2' (Debian, Ubuntu), "
                  "'sudo dnf install portaudio' (Fedora) or 'brew install portaudio' (macOS)")


class CaptureError(Exception):
    """A microphone problem, worded for the user."""


class Capture(Protocol):
    sample_rate: int

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def blocks(self) -> AsyncIterator[bytes]: ...


@dataclass
class InputDevice:
    index: int
    name: str
    channels: int
    default_rate: float
    is_default: bool


def load_sounddevice():
    """The ``sounddevice`` module, or ``CaptureError`` if it or PortAudio is missing."""
    try:
        return importlib.import_module("sounddevice")
    except OSError as exc:  # the package is there, the PortAudio library is not
        raise CaptureError(f"cannot use the microphone: {exc}; {PORTAUDIO_HINT}") from None
    except ImportError as exc:
        raise CaptureError(f"cannot use the microphone: {exc}; install the 'sounddevice' package") from None


def input_devices(sd=None) -> list[InputDevice]:
    """Every device with at least one input channel."""
    sd = sd or load_sounddevice()
    try:
        default_input = sd.default.device[0]
        devices = sd.query_devices()
    except sd.PortAudioError as exc:
        raise CaptureError(f"cannot list audio devices: {exc}") from None
    return [InputDevice(d["index"], d["name"], d["max_input_channels"], d["default_samplerate"],
                        d["index"] == default_input)
            for d in devices if d["max_input_channels"] > 0]


class SoundDeviceCapture:
    """PortAudio input stream (mono int16) whose blocks are handed to the asyncio loop.

    Opens the device at 16 kHz, or at its default rate if it refuses 16 kHz (the
    server resamples). ``device`` is an index, a name substring, or None (default).
    """

    def __init__(self, device: int | str | None = None, block_ms: int = BLOCK_MS, sd=None):
        self._sd = sd or load_sounddevice()
        self.device_name, self.device, self.sample_rate = self._choose(device)
        self.block_frames = self.sample_rate * block_ms // 1000
        self.overflows = 0
        self._stream = None
        self._queue: asyncio.Queue[bytes | None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _choose(self, device: int | str | None) -> tuple[str, int, int]:
        sd = self._sd
        try:
            info = sd.query_devices(device, "input")
        except ValueError as exc:  # unknown name or index, or an output-only device
            raise CaptureError(f"no input device {device!r} ({exc}); see --list-devices") from None
        except sd.PortAudioError:
            if device is None:
                raise CaptureError("no microphone found: this machine has no default audio input device "
                                   "(see --list-devices)") from None
            raise CaptureError(f"cannot open input device {device!r}; see --list-devices") from None
        for rate in (SAMPLE_RATE, int(info["default_samplerate"])):
            try:
                sd.check_input_settings(device=info["index"], channels=1, dtype="int16", samplerate=rate)
                return info["name"], info["index"], rate
            except (ValueError, sd.PortAudioError):
                continue
        raise CaptureError(f"input device {info['name']!r} cannot record mono 16-bit audio")

    def start(self) -> None:
        """Open the device; blocks queue up until ``blocks()`` reads them. Call from the event loop."""
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()

        def callback(indata, frames, time, status):  # on PortAudio's thread
            if status.input_overflow:
                self.overflows += 1
            self._loop.call_soon_threadsafe(self._queue.put_nowait, bytes(indata))

        try:
            self._stream = self._sd.RawInputStream(samplerate=self.sample_rate, blocksize=self.block_frames,
                                                   device=self.device, channels=1, dtype="int16",
                                                   callback=callback)
            self._stream.start()
        except self._sd.PortAudioError as exc:
            raise CaptureError(f"cannot open input device {self.device_name!r}: {exc}") from None

    def stop(self) -> None:
        """Stop recording; ``blocks()`` ends after the blocks already captured."""
        if self._stream is not None:
            self._stream.stop()  # returns once the callback has run for the last time
            self._stream.close()
            self._stream = None
            # call_soon, not put_nowait: it queues behind blocks the callback already handed over
            self._loop.call_soon(self._queue.put_nowait, None)

    async def blocks(self) -> AsyncIterator[bytes]:
        while (block := await self._queue.get()) is not None:
            yield block
