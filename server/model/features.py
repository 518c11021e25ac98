"""Streaming feature front end, identical to torchaudio's EMFORMER_RNNT_BASE_LIBRISPEECH.

The model consumes the audio in *windows*: one 160 ms segment (2560 samples at
16 kHz) plus 40 ms of right context (640 samples), 3200 samples in all. A
window yields 21 mel frames (n_fft 400, hop 160, centred, reflect-padded at the
window edges); the encoder's 4x time reduction keeps the first 20: 16 segment
frames and 4 right-context frames. Consecutive windows start 2560 samples apart,
so the right-context samples of one window are the first samples of the next.
This is exactly torchaudio's ``RNNTBundle.get_streaming_feature_extractor()``
applied to ``waveform[i * 2560 : i * 2560 + 3200]`` (zero-padded), which is what
the tests check.

Shapes: ``FeatureFrontEnd`` maps ``(B, 3200)`` float waveforms in [-1, 1] to
``(B, 21, 80)`` normalised log-mel features.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torchaudio

from server.types import (HOP_LENGTH, RIGHT_CONTEXT_FRAMES, RIGHT_CONTEXT_SAMPLES, SAMPLE_RATE, SEGMENT_FRAMES,
                          SEGMENT_SAMPLES, WINDOW_SAMPLES)

N_FFT = 400
N_MELS = 80
# torchaudio's pipeline scales the mel power by the int16 full-scale power (gain ~1.07e9).
_DECIBEL = 2 * 20 * math.log10(32767)
GAIN = pow(10, 0.05 * _DECIBEL)


@dataclass(frozen=True)
class GlobalStats:
    """Per-mel-bin normalisation: ``(x - mean) * invstddev`` (80 values each)."""

    mean: list[float]
    invstddev: list[float]

    @classmethod
    def load(cls, path: str | Path) -> "GlobalStats":
        with open(path) as f:
            blob = json.load(f)
        stats = cls([float(v) for v in blob["mean"]], [float(v) for v in blob["invstddev"]])
        if len(stats.mean) != N_MELS or len(stats.invstddev) != N_MELS:
            raise ValueError(f"{path}: expected {N_MELS} mean and invstddev values")
        return stats

    @classmethod
    def identity(cls) -> "GlobalStats":
        return cls([0.0] * N_MELS, [1.0] * N_MELS)

    def save(self, path: str | Path) -> None:
        with open(path, "w") as f:
            json.dump({"mean": self.mean, "invstddev": self.invstddev}, f)


def piecewise_linear_log(x: torch.Tensor) -> torch.Tensor:
    """torchaudio's ``_piecewise_linear_log``, out of place.

    torchaudio applies two masked assignments in sequence, so values in
    (e, e**e] end up as ``log(x) / e``; the models were trained with that, so it
    is reproduced here exactly.
    """
    y = torch.where(x > math.e, torch.log(x.clamp_min(1e-30)), x)
    return torch.where(y <= math.e, y / math.e, y)


class FeatureFrontEnd(torch.nn.Module):
    """Batched log-mel front end: ``(B, N)`` waveforms -> ``(B, N // 160 + 1, 80)`` features."""

    def __init__(self, stats: GlobalStats):
        super().__init__()
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, hop_length=HOP_LENGTH)
        self.register_buffer("mean", torch.tensor(stats.mean))
        self.register_buffer("invstddev", torch.tensor(stats.invstddev))

    def log_mel(self, waveforms: torch.Tensor) -> torch.Tensor:
        """Un-normalised piecewise-log mel features, ``(B, frames, 80)``."""
        return piecewise_linear_log(self.mel(waveforms).transpose(1, 2) * GAIN)

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        return (self.log_mel(waveforms) - self.mean) * self.invstddev


def num_windows(num_samples: int) -> int:
    """Windows a stream of ``num_samples`` samples is cut into (the last ones zero-padded)."""
    return max(1, math.ceil(num_samples / SEGMENT_SAMPLES))


def utterance_windows(waveform: torch.Tensor) -> torch.Tensor:
    """All windows of a whole utterance, ``(N,) -> (num_windows, 3200)``, zero-padded at the end.

    Window ``i`` is ``waveform[i * 2560 : i * 2560 + 3200]``: what a stream yields chunk by chunk.
    """
    n = num_windows(waveform.numel())
    padded = torch.nn.functional.pad(waveform, (0, n * SEGMENT_SAMPLES + RIGHT_CONTEXT_SAMPLES - waveform.numel()))
    return padded.unfold(0, WINDOW_SAMPLES, SEGMENT_SAMPLES)


def utterance_features(front_end: FeatureFrontEnd, waveform: torch.Tensor) -> torch.Tensor:
    """Whole-utterance features as the streaming encoder sees them, for training.

    Concatenates the 16 segment frames of every window, then the 4 right-context
    frames of the last window: ``(num_windows * 16 + 4, 80)``.
    """
    feats = front_end(utterance_windows(waveform))
    segments = feats[:, :SEGMENT_FRAMES].reshape(-1, N_MELS)
    return torch.cat([segments, feats[-1, SEGMENT_FRAMES:SEGMENT_FRAMES + RIGHT_CONTEXT_FRAMES]])
