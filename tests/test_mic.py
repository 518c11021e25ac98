"""The microphone client (asr-mic): its streaming code driven by a fake capture source, and the
PortAudio adapter driven by a fake ``sounddevice`` module (so no test needs PortAudio)."""

import asyncio
import io
import signal
import threading
import time
import types

import numpy as np
import pytest
import soundfile

from client import capture as capture_module
from client import mic
from client.capture import CaptureError, SoundDeviceCapture
from client.stream import pcm16
from tests.conftest import SAMPLES
from tests.helpers import final_results

BLOCK = 2560  # 160 ms at 16 kHz


class FakeCapture:
    """Plays a WAV as if spoken into the microphone, then silence, then presses Ctrl-C.

    Records every byte it handed out, so a test can stream exactly the same audio through
    the plain gRPC helper and compare.
    """

    sample_rate = 16000

    def __init__(self, wav, silence_s: float = 0.5, realtime: bool = True):
        audio, rate = soundfile.read(str(wav), dtype="float32")
        assert rate == self.sample_rate
        silence = np.zeros(int(silence_s * rate), dtype=np.float32)
        self.audio = pcm16(np.concatenate([audio, silence]))
        self.realtime = realtime
        self.sent = bytearray()
        self.started = self.stopped = False
        self._stop = asyncio.Event()

    def start(self):
        self.started = True

    def stop(self):
        self.stopped = True
        self._stop.set()

    async def blocks(self):
        start = time.monotonic()
        for offset in range(0, len(self.audio), 2 * BLOCK):
            if self._stop.is_set():
                return
            block = self.audio[offset:offset + 2 * BLOCK]
            if self.realtime:
                await asyncio.sleep(max(0.0, start + (offset + len(block)) / 32000 - time.monotonic()))
            self.sent += block
            yield block
        # The user presses Ctrl-C; a real microphone would go on recording until then.
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler, "asr-mic installed no handler"
        signal.raise_signal(signal.SIGINT)
        await asyncio.wait_for(self._stop.wait(), 10)


def _args(server, *extra):
    return mic.build_parser().parse_args(["--server", f"127.0.0.1:{server.port}", *extra])


async def test_mic_client_streams_live_and_prints_the_last_final_on_ctrl_c(small_server):
    server, stub = small_server
    wav = sorted(SAMPLES.glob("*.wav"))[0]
    fake = FakeCapture(wav)
    out, err = io.StringIO(), io.StringIO()
    rc = await asyncio.wait_for(mic.run(_args(server, "--timing"), fake, out=out, err=err), 60)
    assert rc == 0, err.getvalue()
    assert fake.started and fake.stopped and "stopping" in err.getvalue()
    lines = out.getvalue().splitlines()
    interims = [line for line in lines if line.startswith("…")]
    finals = [line for line in lines if not line.startswith("…")]
    assert interims, "no live interim transcript was shown"
    assert all(line.endswith(" ms]") for line in lines), lines  # --timing: the server's latency
    # Ctrl-C half-closed the stream and the finals printed are exactly the server's finals for
    # the audio the microphone delivered (the last one comes after Ctrl-C).
    expected = [r.alternatives[0].transcript for r in await final_results(stub, np.frombuffer(
        bytes(fake.sent), "<i2").astype(np.float32) / 32768)]
    assert expected and expected[-1]
    assert [line.rsplit("  [", 1)[0] for line in finals] == expected


async def test_mic_client_says_when_the_server_is_unreachable():
    fake = FakeCapture(sorted(SAMPLES.glob("*.wav"))[0], realtime=False)
    args = mic.build_parser().parse_args(["--server", "127.0.0.1:1"])
    err = io.StringIO()
    rc = await asyncio.wait_for(mic.run(args, fake, out=io.StringIO(), err=err), 60)
    assert rc == 1
    assert "UNAVAILABLE" in err.getvalue() and "is the server running at 127.0.0.1:1" in err.getvalue()
    assert fake.stopped


# --- the PortAudio adapter, with a fake sounddevice module ------------------------------------

class FakePortAudioError(Exception):
    pass


def fake_sounddevice(devices, default_input=0, rates=(16000, 44100), block_count=12):
    """A stand-in for the sounddevice module: ``devices`` are (name, inputs, default rate)."""
    table = [{"index": i, "name": n, "max_input_channels": c, "max_output_channels": 2, "default_samplerate": r}
             for i, (n, c, r) in enumerate(devices)]

    def query_devices(device=None, kind=None):
        if device is None and kind is None:
            return table
        if device is None:
            if default_input < 0:
                raise FakePortAudioError("Error querying device -1")
            device = default_input
        matches = [d for d in table if device == d["index"] or (isinstance(device, str) and device in d["name"])]
        if not matches:
            raise ValueError(f"No input device matching {device!r}")
        if kind and matches[0]["max_input_channels"] < 1:
            raise ValueError(f"Not an input device: {matches[0]['name']!r}")
        return matches[0]

    def check_input_settings(device, channels, dtype, samplerate):
        if samplerate not in rates:
            raise FakePortAudioError("Invalid sample rate")

    class RawInputStream:
        """Calls ``callback`` from its own thread, like PortAudio, with numbered blocks."""

        def __init__(self, samplerate, blocksize, device, channels, dtype, callback):
            self.blocksize, self.callback = blocksize, callback
            self.running = threading.Event()
            self.thread = threading.Thread(target=self._run)

        def _run(self):
            for i in range(block_count):
                if not self.running.is_set():
                    return
                status = types.SimpleNamespace(input_overflow=(i == 3))
                self.callback(np.full(self.blocksize, i, "<i2").tobytes(), self.blocksize, None, status)
                time.sleep(0.005)

        def start(self):
            self.running.set()
            self.thread.start()

        def stop(self):
            self.running.clear()
            self.thread.join()

        def close(self):
            pass

    return types.SimpleNamespace(PortAudioError=FakePortAudioError, query_devices=query_devices,
                                 check_input_settings=check_input_settings, RawInputStream=RawInputStream,
                                 default=types.SimpleNamespace(device=(default_input, 1)))


async def test_sounddevice_capture_hands_every_block_to_the_loop_in_order():
    sd = fake_sounddevice([("Speakers", 0, 48000), ("USB mic", 1, 44100)], default_input=1,
                          rates=(44100,), block_count=12)
    cap = SoundDeviceCapture(sd=sd)
    assert (cap.device_name, cap.sample_rate) == ("USB mic", 44100)  # refuses 16 kHz: its own rate
    cap.start()
    received = []
    async for block in cap.blocks():
        received.append(np.frombuffer(block, "<i2"))
        if len(received) == 5:
            cap.stop()  # blocks already captured are still delivered, then the iterator ends
    values = [int(b[0]) for b in received]
    assert values == list(range(len(values))) and 5 <= len(values) <= 12
    assert all(len(b) == 44100 * 160 // 1000 for b in received)
    assert cap.overflows == 1


def test_sounddevice_capture_prefers_16_khz_and_finds_devices_by_name():
    sd = fake_sounddevice([("Speakers", 0, 48000), ("Built-in mic", 2, 48000), ("USB headset", 1, 44100)])
    cap = SoundDeviceCapture("headset", sd=sd)
    assert (cap.device, cap.sample_rate, cap.block_frames) == (2, 16000, 2560)


@pytest.mark.parametrize("device, devices, default_input, message", [
    (None, [("Speakers", 0, 48000)], -1, "no microphone found"),
    ("usb", [("Built-in mic", 1, 48000)], 0, "no input device 'usb'"),
    (0, [("Speakers", 0, 48000), ("mic", 1, 48000)], 1, "Not an input device: 'Speakers'"),
])
def test_capture_errors_are_worded_for_the_user(device, devices, default_input, message):
    with pytest.raises(CaptureError, match=message):
        SoundDeviceCapture(device, sd=fake_sounddevice(devices, default_input=default_input))


def test_asr_mic_without_portaudio_says_how_to_install_it(monkeypatch, capsys):
    def missing(name):
        raise OSError("PortAudio library not found")

    monkeypatch.setattr(capture_module.importlib, "import_module", missing)
    for argv in (["--list-devices"], []):
        assert mic.main(argv) == 2
        err = capsys.readouterr().err
        assert "PortAudio library not found" in err and "libportaudio2" in err, err
        assert "Traceback" not in err


def test_asr_mic_without_an_input_device_says_so(monkeypatch, capsys):
    sd = fake_sounddevice([("HDMI output", 0, 48000)], default_input=-1)
    monkeypatch.setattr(capture_module.importlib, "import_module", lambda name: sd)
    assert mic.main(["--list-devices"]) == 0
    assert "no audio input devices found" in capsys.readouterr().out
    assert mic.main([]) == 2
    assert "no microphone found" in capsys.readouterr().err


def test_asr_mic_lists_input_devices_marking_the_default(monkeypatch, capsys):
    sd = fake_sounddevice([("HDMI output", 0, 48000), ("Built-in mic", 2, 48000), ("USB mic", 1, 44100)],
                          default_input=2)
    monkeypatch.setattr(capture_module.importlib, "import_module", lambda name: sd)
    assert mic.main(["--list-devices"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split()[:2] for line in lines] == [["1", "Built-in"], ["*", "2"]]
    assert "44100 Hz" in lines[1]
