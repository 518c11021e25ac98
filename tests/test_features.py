"""The streaming front end equals torchaudio's EMFORMER_RNNT_BASE_LIBRISPEECH streaming extractor."""

import numpy as np
import torch

from server.model.features import (FeatureFrontEnd, GlobalStats, piecewise_linear_log, utterance_features,
                                   utterance_windows)
from server.types import WINDOW_FRAMES
from tests.reference import torchaudio_streaming_extractor, windows

# Same operations in the same order on the same float32 data: equal to float rounding.
TOLERANCE = 1e-5


def _stats(seed=0):
    g = torch.Generator().manual_seed(seed)
    return GlobalStats(torch.randn(80, generator=g).tolist(), (torch.rand(80, generator=g) + 0.5).tolist())


def test_front_end_equals_torchaudio_streaming_extractor(speech):
    stats = _stats()
    ours = FeatureFrontEnd(stats)
    reference = torchaudio_streaming_extractor(stats)
    for _, audio, _ in speech:
        waveform = torch.from_numpy(audio)
        ref_windows = list(windows(waveform))
        our_windows = utterance_windows(waveform)
        assert len(ref_windows) == our_windows.shape[0]
        batch = ours(our_windows)
        assert batch.shape == (len(ref_windows), WINDOW_FRAMES, 80)
        for i, window in enumerate(ref_windows):
            assert torch.equal(window, our_windows[i])
            expected, length = reference(window.clone())
            assert int(length) == WINDOW_FRAMES
            torch.testing.assert_close(batch[i], expected, rtol=0, atol=TOLERANCE)


def test_piecewise_log_reproduces_torchaudio_quirk():
    from torchaudio.pipelines.rnnt_pipeline import _piecewise_linear_log

    x = torch.tensor([0.0, 1.0, 2.7, 3.0, 10.0, 15.0, 16.0, 1e6])
    torch.testing.assert_close(piecewise_linear_log(x), _piecewise_linear_log(x.clone()), rtol=0, atol=0)
    # values in (e, e**e] end up as log(x) / e, as torchaudio computes them
    assert abs(float(piecewise_linear_log(torch.tensor([10.0]))) - float(np.log(10.0) / np.e)) < 1e-6


def test_utterance_features_are_the_segments_of_the_streaming_windows(speech):
    fe = FeatureFrontEnd(_stats(1))
    waveform = torch.from_numpy(speech[0][1])
    feats = utterance_features(fe, waveform)
    per_window = fe(utterance_windows(waveform))
    assert feats.shape == (per_window.shape[0] * 16 + 4, 80)
    torch.testing.assert_close(feats[16:32], per_window[1, :16])
    torch.testing.assert_close(feats[-4:], per_window[-1, 16:20])


def test_global_stats_file_round_trip(tmp_path):
    stats = _stats(2)
    stats.save(tmp_path / "s.json")
    assert GlobalStats.load(tmp_path / "s.json") == stats
