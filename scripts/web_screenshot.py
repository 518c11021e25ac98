"""Screenshot of the asr-web page for the README (docs/img/web.png).

Starts ``asr-server --model MODEL`` and the asr-web bridge, plays bundled samples
(with pauses, so each gets its own final result) into headless Chromium's fake
microphone, and saves the page once the last result is in.

    .venv/bin/python scripts/web_screenshot.py --model demo
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from client import web  # noqa: E402
from client.spawn import spawned_server  # noqa: E402
from tests.browser import transcribe_in_browser  # noqa: E402


def joined_samples(paths: list[Path], target: Path, pause_s: float = 1.2) -> float:
    """The samples one after another with pauses around them; returns the duration in seconds."""
    pause = np.zeros(int(pause_s * 16000), np.int16)
    parts = [pause]
    for path in paths:
        audio, rate = soundfile.read(str(path), dtype="int16")
        assert rate == 16000, path
        parts += [audio, pause]
    audio = np.concatenate(parts + [pause])
    soundfile.write(str(target), audio, 16000, subtype="PCM_16")
    return len(audio) / 16000


async def capture(address: str, wav: Path, seconds: float, out: Path) -> None:
    runner, port = await web.start(web.create_app(address))
    try:
        page = await transcribe_in_browser(f"http://127.0.0.1:{port}/", wav, stop_after_s=seconds - 0.6,
                                           screenshot=out)
    finally:
        await runner.cleanup()
    print("\n".join(page.finals))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="asr-server --model (default: %(default)s)")
    p.add_argument("--samples", type=int, default=2, help="how many bundled samples to play (default: %(default)s)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "web.png")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "microphone.wav"
        seconds = joined_samples(sorted((ROOT / "samples").glob("*.wav"))[:args.samples], wav)
        with spawned_server("--model", args.model) as (address, _):
            asyncio.run(capture(address, wav, seconds, args.out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
