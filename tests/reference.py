"""torchaudio's own single-stream streaming path, as the tests' reference.

This follows the streaming example of ``torchaudio.pipelines.RNNTBundle``:
windows ``waveform[i * 2560 : i * 2560 + 3200]`` (zero-padded), the bundle's
streaming feature extractor, and ``RNNTBeamSearch.infer`` carrying state and
hypotheses from window to window.
"""

from __future__ import annotations

import math

import torch
from torchaudio.models import RNNTBeamSearch

from bench.seed_loop import SEGMENT, torchaudio_streaming_extractor, windows  # noqa: F401


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
