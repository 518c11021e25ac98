"""Audio intake: request bytes -> 16 kHz mono float32 samples, chunk by chunk.

``AudioDecoder`` turns audio (LINEAR16 or FLOAT32, interleaved channels, any sample rate
from 8 to 48 kHz) into model-rate mono samples. Each message is checked whole (``frames``),
then decoded in pieces as the session needs them (``decode``), so a large message never
becomes a large float array. The resampler (libsoxr, streaming) keeps its filter state
between pieces and messages, so the output does not depend on how the audio was split.
"""

from __future__ import annotations

import numpy as np
import soxr

from server.errors import invalid
from server.types import SAMPLE_RATE, Encoding, StreamConfig

CHECK_PIECE_BYTES = 1 << 20


class AudioDecoder:
    """Stateful decoder for one stream: ``decode(bytes) -> float32 array`` at 16 kHz mono."""

    def __init__(self, config: StreamConfig):
        self.config = config
        self.encoding = config.encoding
        self.channels = config.channels
        self.frame_bytes = config.frame_bytes
        self._resampler = (None if config.sample_rate_hertz == SAMPLE_RATE else
                           soxr.ResampleStream(config.sample_rate_hertz, SAMPLE_RATE, 1,
                                               dtype="float32", quality="HQ"))

    def frames(self, data: bytes | memoryview) -> int:
        """Sample frames in one message, checked whole before any of it is decoded: ``ASRError``
        for a partial sample or (FLOAT32) a NaN or infinite one."""
        if len(data) % self.frame_bytes:
            raise invalid(
                f"audio_content has {len(data)} bytes, not a multiple of {self.frame_bytes} "
                f"({self.encoding.name}, {self.channels} channel{'s' if self.channels > 1 else ''}): "
                "send whole samples in every message")
        if self.encoding is Encoding.FLOAT32:
            for start in range(0, len(data), CHECK_PIECE_BYTES):  # bounded temporaries
                if not np.isfinite(np.frombuffer(data[start:start + CHECK_PIECE_BYTES], dtype="<f4")).all():
                    raise invalid("audio_content holds NaN or infinite FLOAT32 samples")
        return len(data) // self.frame_bytes

    def decode(self, data: bytes | memoryview) -> np.ndarray:
        """Whole frames (checked by ``frames``) -> 16 kHz mono float32 samples."""
        if self.encoding is Encoding.LINEAR16:
            samples = np.frombuffer(data, dtype="<i2").astype(np.float32) * (1.0 / 32768.0)
        else:
            samples = np.frombuffer(data, dtype="<f4").astype(np.float32)
            np.clip(samples, -1.0, 1.0, out=samples)
        if self.channels > 1:
            samples = samples.reshape(-1, self.channels).mean(axis=1, dtype=np.float32)
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples)
        return samples

    def flush(self) -> np.ndarray:
        """Samples the resampler still holds, at end of stream."""
        if self._resampler is None:
            return np.zeros(0, dtype=np.float32)
        return self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
