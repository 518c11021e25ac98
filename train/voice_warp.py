"""New speakers from a synthesizer's voice: LPC analysis, per-formant pole warp, resynthesis.

A concatenative or parametric voice is one speaker: one vocal tract. This module turns its
output into another speaker's by moving the resonances, not the source: each 20 ms frame is
split into an all-pole vocal-tract filter (linear prediction) and its residual (the voice's own
glottal excitation, pitch and diphone joins kept), the filter's poles are moved by a smooth,
non-uniform frequency warp and their bandwidths scaled, and the residual is filtered again by
the warped filter. Unlike a uniform vocal-tract-length warp of the spectrum (which training
applies to every utterance, ``train_demo.timbre_augment``), each formant region moves by a
factor of its own, so the relations between formants change as they do between speakers.

``warp_voice(x, rate, VoiceWarp.identity())`` returns ``x`` (to rounding): the analysis and
resynthesis are exact inverses, so only the warp changes the voice.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torchaudio.functional

ANCHORS_HZ = (0.0, 600.0, 1500.0, 2600.0, 4000.0)  # where the warp's factors are drawn


@dataclass(frozen=True)
class VoiceWarp:
    """A speaker change: formant frequencies scale by ``factors`` (one per ``ANCHORS_HZ`` entry,
    interpolated between them, 1 at the Nyquist frequency), bandwidths by ``bandwidth``."""

    factors: tuple[float, ...]
    bandwidth: float

    @classmethod
    def identity(cls) -> "VoiceWarp":
        return cls(tuple(1.0 for _ in ANCHORS_HZ), 1.0)

    @classmethod
    def random(cls, rng: random.Random) -> "VoiceWarp":
        """A vocal-tract factor 0.85-1.18 shared by all formants, each anchor jittered by +-8 %,
        bandwidths x0.7-1.5."""
        tract = rng.uniform(0.85, 1.18)
        return cls(tuple(tract * rng.uniform(0.92, 1.08) for _ in ANCHORS_HZ), rng.uniform(0.7, 1.5))

    def map_hz(self, hz: np.ndarray, rate: int) -> np.ndarray:
        """Where a resonance at ``hz`` moves to (below ``rate / 2``)."""
        nyquist = rate / 2
        anchors = [a for a in ANCHORS_HZ if a < nyquist]
        factor = np.interp(hz, anchors + [nyquist], list(self.factors[:len(anchors)]) + [1.0])
        return np.clip(hz * factor, 20.0, nyquist * 0.98)


def lpc(frames: np.ndarray, order: int) -> np.ndarray:
    """Prediction polynomials ``(frames, order + 1)``, ``[1, a1, ..., a_order]`` each, of windowed
    ``frames`` ``(frames, samples)`` by the autocorrelation method (Levinson-Durbin, all frames at once)."""
    n = frames.shape[1]
    spectrum = np.fft.rfft(frames, 2 * n)
    r = np.fft.irfft(np.abs(spectrum) ** 2, 2 * n)[:, :order + 1]
    r[:, 0] = r[:, 0] * (1.0 + 1e-6) + 1e-12  # white-noise floor: stable, well-conditioned filters
    r[:, 1:] *= np.exp(-0.5 * (np.arange(1, order + 1) * 0.0025) ** 2)  # lag window
    a = np.zeros((len(frames), order + 1))
    a[:, 0] = 1.0
    error = r[:, 0].copy()
    for i in range(1, order + 1):
        k = -(r[:, i] + np.sum(a[:, 1:i] * r[:, i - 1:0:-1], axis=1)) / error
        a[:, 1:i + 1] = a[:, 1:i + 1] + k[:, None] * a[:, i - 1::-1][:, :i]
        error *= 1.0 - k ** 2
    return a


def _warp_poles(a: np.ndarray, warp: VoiceWarp, rate: int) -> np.ndarray:
    """The polynomial whose complex poles sit at ``warp.map_hz`` of the old ones' frequencies, their
    radii raised to ``warp.bandwidth`` (bandwidth scales by it); real poles stay."""
    poles = np.roots(a)
    keep = poles[np.abs(poles.imag) <= 1e-9]
    upper = poles[poles.imag > 1e-9]
    radius = np.minimum(np.abs(upper), 0.995) ** warp.bandwidth
    hz = np.angle(upper) * rate / (2 * np.pi)
    moved = radius * np.exp(2j * np.pi * warp.map_hz(hz, rate) / rate)
    return np.real(np.poly(np.concatenate([keep, moved, moved.conj()])))


def warp_voice(x: np.ndarray, rate: int, warp: VoiceWarp, frame_ms: float = 20.0) -> np.ndarray:
    """``x`` (float, mono, ``rate`` Hz) spoken by the speaker ``warp`` makes of it; same length.

    Frames of ``frame_ms`` with half overlap under a periodic Hann window (the frames sum to
    ``x``); each frame's residual under its own LPC filter (order 2 + rate / 1000) is filtered by
    the warped filter, scaled to the frame's energy, its tail carried into the following
    samples, and the frames added."""
    order = 2 + rate // 1000
    n = int(rate * frame_ms / 1000) // 2 * 2
    hop = n // 2
    tail = 4 * n  # room for the warped filter's ringing
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)  # periodic Hann
    pad = np.concatenate([np.zeros(hop), np.asarray(x, dtype=np.float64), np.zeros(n)])
    starts = np.arange(0, len(pad) - n + 1, hop)
    frames = pad[starts[:, None] + np.arange(n)] * window
    a = lpc(frames, order)
    long = np.concatenate([frames, np.zeros((len(frames), order + tail))], axis=1)
    residual = sum(a[:, j:j + 1] * np.roll(long, j, axis=1) for j in range(order + 1))
    identity = warp == VoiceWarp.identity()
    b = a if identity else np.stack([_warp_poles(row, warp, rate) for row in a])
    y = torchaudio.functional.lfilter(torch.from_numpy(residual), torch.from_numpy(b),
                                      torch.from_numpy(np.eye(1, order + 1).repeat(len(b), 0)),
                                      clamp=False).numpy()
    if not identity:  # the warp changes each filter's gain: keep each frame's energy
        y *= np.sqrt(np.sum(frames ** 2, axis=1) / np.maximum(np.sum(y ** 2, axis=1), 1e-12))[:, None]
    out = np.zeros(len(pad) + order + tail)
    for start, row in zip(starts, y):
        out[start:start + len(row)] += row
    return out[hop:hop + len(x)]
