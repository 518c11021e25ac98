"""torchaudio's own single-stream streaming path, as the tests' reference.

This follows the streaming example of ``torchaudio.pipelines.RNNTBundle``:
windows ``waveform[i * 2560 : i * 2560 + 3200]`` (zero-padded), the bundle's
streaming feature extractor, and ``RNNTBeamSearch.infer`` carrying state and
hypotheses from window to window.
"""

from __future__ import annotations

import json
import math
import tempfile

import torch
import torchaudio
from torchaudio.models import RNNTBeamSearch
from torchaudio.pipelines.rnnt_pipeline import (_FunctionalModule, _gain, _GlobalStatsNormalization,
                                                _ModuleFeatureExtractor, _piecewise_linear_log)

SEGMENT = 2560
WINDOW = 3200


def torchaudio_streaming_extractor(stats) -> _ModuleFeatureExtractor:
    """The bundle's ``get_streaming_feature_extractor()``, with the given global stats."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"mean": stats.mean, "invstddev": stats.invstddev}, f)
    return _ModuleFeatureExtractor(torch.nn.Sequential(
        torchaudio.transforms.MelSpectrogram(sample_rate=16000, n_fft=400, n_mels=80, hop_length=160),
        _FunctionalModule(lambda x: x.transpose(1, 0)),
        _FunctionalModule(lambda x: _piecewise_linear_log(x * _gain)),
        _GlobalStatsNormalization(f.name)))


def windows(waveform: torch.Tensor):
    for idx in range(0, max(1, len(waveform)), SEGMENT):
        segment = waveform[idx: idx + WINDOW]
        yield torch.nn.functional.pad(segment, (0, WINDOW - len(segment)))


@torch.inference_mode()
def beam_search_tokens(model, waveform: torch.Tensor, beam: int) -> list[int]:
    """Best hypothesis of ``RNNTBeamSearch.infer`` over the stream's windows (start symbol dropped)."""
    extractor = torchaudio_streaming_extractor(model.stats)
    decoder = RNNTBeamSearch(model.rnnt, model.blank)
    state, hypotheses = None, None
    for window in windows(waveform):
        features, length = extractor(window)
        hypotheses, state = decoder.infer(features, length, beam, state=state, hypothesis=hypotheses)
    return list(hypotheses[0][0][1:])


@torch.inference_mode()
def greedy_tokens(model, waveform: torch.Tensor, max_symbols: int = 10) -> list[int]:
    """Greedy decoding over ``RNNT.transcribe_streaming`` outputs, one stream, window by window."""
    extractor = torchaudio_streaming_extractor(model.stats)
    rnnt, blank = model.rnnt, model.blank
    pred, _, pstate = rnnt.predict(torch.tensor([[blank]]), torch.tensor([1]), None)
    state, tokens = None, []
    for window in windows(waveform):
        features, length = extractor(window)
        enc, _, state = rnnt.transcribe_streaming(features[None], length, state)
        for t in range(enc.size(1)):
            for _ in range(max_symbols):
                logits, _, _ = rnnt.join(enc[:, t:t + 1], torch.tensor([1]), pred, torch.tensor([1]))
                k = int(logits[0, 0, 0].argmax())
                if k == blank:
                    break
                tokens.append(k)
                pred, _, pstate = rnnt.predict(torch.tensor([[k]]), torch.tensor([1]), pstate)
    return tokens


@torch.inference_mode()
def encoder_outputs(model, waveform: torch.Tensor) -> torch.Tensor:
    """``transcribe_streaming`` output of every window, concatenated: ``(frames, E)``."""
    extractor = torchaudio_streaming_extractor(model.stats)
    state, outs = None, []
    for window in windows(waveform):
        features, length = extractor(window)
        enc, _, state = model.rnnt.transcribe_streaming(features[None], length, state)
        outs.append(enc[0])
    return torch.cat(outs)


def num_windows(num_samples: int) -> int:
    return max(1, math.ceil(num_samples / SEGMENT))
