"""The baseline every figure is compared to: torchaudio's online-ASR tutorial loop.

One stream at a time, no server: for every 160 ms chunk (plus 40 ms of look-ahead)
the bundle's streaming feature extractor, then ``RNNTBeamSearch.infer`` with beam
10, carrying the Emformer state and the hypotheses from chunk to chunk. To serve N
users this loop takes their chunks one by one in the order they become ready.

``simulate`` replays N real-time streams against that loop in wall-clock time
(streams start at random phases, like independent users) and measures each
chunk's latency the way the capacity benchmark does: from the moment the chunk's
last sample (look-ahead included) exists to the moment its result is ready.
"""

from __future__ import annotations

import heapq
import json
import random
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torchaudio
from torchaudio.models import RNNTBeamSearch
from torchaudio.pipelines.rnnt_pipeline import (_FunctionalModule, _gain, _GlobalStatsNormalization,
                                                _ModuleFeatureExtractor, _piecewise_linear_log)

SEGMENT = 2560  # samples per chunk (160 ms at 16 kHz)
WINDOW = 3200  # chunk + 40 ms right context
CHUNK_S = SEGMENT / 16000
RIGHT_CONTEXT_S = (WINDOW - SEGMENT) / 16000
SEED_BEAM = 10


def torchaudio_streaming_extractor(stats) -> _ModuleFeatureExtractor:
    """torchaudio's ``EMFORMER_RNNT_BASE_LIBRISPEECH.get_streaming_feature_extractor()``,
    built with the given global stats (``mean`` / ``invstddev`` lists) instead of downloading them."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"mean": stats.mean, "invstddev": stats.invstddev}, f)
    return _ModuleFeatureExtractor(torch.nn.Sequential(
        torchaudio.transforms.MelSpectrogram(sample_rate=16000, n_fft=400, n_mels=80, hop_length=160),
        _FunctionalModule(lambda x: x.transpose(1, 0)),
        _FunctionalModule(lambda x: _piecewise_linear_log(x * _gain)),
        _GlobalStatsNormalization(f.name)))


def windows(waveform: torch.Tensor):
    """The tutorial's chunking: ``waveform[i*2560 : i*2560+3200]``, zero-padded at the end."""
    for idx in range(0, max(1, len(waveform)), SEGMENT):
        segment = waveform[idx: idx + WINDOW]
        yield torch.nn.functional.pad(segment, (0, WINDOW - len(segment)))


class SeedStream:
    """One user's state in the tutorial loop."""

    def __init__(self, rnnt, blank: int, stats, beam: int = SEED_BEAM, step_max_tokens: int | None = None):
        """``step_max_tokens``: the tutorial's default (100) unless given; the benchmark passes the
        model's per-frame symbol cap, as the server uses it (random-base: 1)."""
        self.extractor = torchaudio_streaming_extractor(stats)
        self.decoder = RNNTBeamSearch(rnnt, blank, **({"step_max_tokens": step_max_tokens}
                                                        if step_max_tokens else {}))
        self.beam = beam
        self.state = None
        self.hypotheses = None

    @torch.inference_mode()
    def step(self, window: torch.Tensor) -> list[int]:
        features, length = self.extractor(window)
        self.hypotheses, self.state = self.decoder.infer(features, length, self.beam, state=self.state,
                                                         hypothesis=self.hypotheses)
        return list(self.hypotheses[0][0][1:])


@dataclass
class SeedRun:
    streams: int
    latencies_ms: list[float] = field(default_factory=list)
    chunks: int = 0
    busy_s: float = 0.0
    wall_s: float = 0.0

    def summary(self) -> dict:
        lat = self.latencies_ms

        def pct(q):
            return float(np.percentile(lat, q)) if lat else None

        return {"streams": self.streams, "errors": {},
                "chunk_latency_ms": {"p50": pct(50), "p95": pct(95), "p99": pct(99),
                                     "max": max(lat) if lat else None, "count": len(lat)},
                "chunks": self.chunks, "busy_fraction": round(self.busy_s / self.wall_s, 3) if self.wall_s else None,
                "rtf": round(self.busy_s / (self.chunks * CHUNK_S), 3) if self.chunks else None}


def _stream(model, beam: int) -> SeedStream:
    return SeedStream(model.rnnt, model.blank, model.stats, beam, model.max_symbols_per_frame)


def simulate(model, audio: list[np.ndarray], streams: int, duration_s: float, beam: int = SEED_BEAM,
             seed: int = 0) -> SeedRun:
    """Serve ``streams`` real-time users with the tutorial loop for ``duration_s`` seconds.

    ``audio``: 16 kHz mono float32 waveforms; each user plays them back to back
    (a new stream state per file), starting at a random phase in its first chunk.
    """
    rng = random.Random(seed)
    run = SeedRun(streams)
    chunked = [list(windows(torch.from_numpy(a))) for a in audio]
    t0 = time.monotonic() + 0.05
    # heap of (ready_at, user, file index, chunk index)
    ready: list[tuple[float, int, int, int]] = []
    users = []
    for u in range(streams):
        start = t0 + rng.random() * CHUNK_S
        f = rng.randrange(len(chunked))
        users.append({"file": f, "start": start, "stream": _stream(model, beam)})
        heapq.heappush(ready, (start + CHUNK_S + RIGHT_CONTEXT_S, u, f, 0))
    end = t0 + duration_s
    while ready:
        ready_at, u, f, i = heapq.heappop(ready)
        if ready_at > end:
            break
        now = time.monotonic()
        if ready_at > now:
            time.sleep(ready_at - now)
        user = users[u]
        began = time.monotonic()
        user["stream"].step(chunked[f][i])
        finished = time.monotonic()
        run.busy_s += finished - began
        run.chunks += 1
        run.latencies_ms.append((finished - ready_at) * 1000)
        if i + 1 < len(chunked[f]):
            heapq.heappush(ready, (ready_at + CHUNK_S, u, f, i + 1))
        else:  # next file, a fresh stream, starting right after this one's audio
            nf = (f + 1) % len(chunked)
            user["stream"] = _stream(model, beam)
            heapq.heappush(ready, (ready_at + CHUNK_S, u, nf, 0))
    run.wall_s = time.monotonic() - t0
    return run
