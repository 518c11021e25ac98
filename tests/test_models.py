"""Model sources: bundle:DIR and demo:DIR from local files with clear errors, random models, the token tables."""

import dataclasses
import io
import json
import shutil
import sys

import pytest
import sentencepiece
import torch

from server.config import ServerSettings
from server.model.loading import (BASE_CONFIG, BUNDLE_FILES, DEMO_DIR, ModelLoadError, load_bundle, load_demo,
                                  load_model, random_model)
from server.model.vocabulary import CharTokenTable, SentencePieceTokenTable, Word

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent / "train"))
from sentences import generate  # noqa: E402


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    """A directory laid out like torchaudio's LibriSpeech bundle: real files, random weights."""
    d = tmp_path_factory.mktemp("bundle")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(generate(3000, 1)), model_writer=model,
                                             vocab_size=120, model_type="bpe")
    (d / BUNDLE_FILES["tokens"]).write_bytes(model.getvalue())
    tokens = SentencePieceTokenTable(d / BUNDLE_FILES["tokens"])
    config = dataclasses.replace(BASE_CONFIG, num_symbols=tokens.size)
    torch.save(random_model(config, seed=5).rnnt.state_dict(), d / BUNDLE_FILES["weights"])
    (d / BUNDLE_FILES["stats"]).write_text(json.dumps({"mean": [0.5] * 80, "invstddev": [2.0] * 80}))
    return d


def test_bundle_directory_loads(bundle_dir):
    model = load_model(f"bundle:{bundle_dir}")
    assert model.name == f"bundle:{bundle_dir}"
    assert model.blank == model.tokens.size - 1 == 120
    assert model.stats.mean[0] == 0.5 and model.stats.invstddev[0] == 2.0
    assert model.config.transformer_num_layers == 20 and 70e6 < model.num_parameters < 77e6


@pytest.mark.parametrize("kind", list(BUNDLE_FILES))
def test_bundle_missing_file_is_named(bundle_dir, tmp_path, kind):
    for k, name in BUNDLE_FILES.items():
        if k != kind:
            (tmp_path / name).symlink_to(bundle_dir / name)
    with pytest.raises(ModelLoadError, match=BUNDLE_FILES[kind]):
        load_bundle(tmp_path)


@pytest.mark.parametrize("kind, content", [("weights", b"not a torch file"), ("stats", b"{oops"),
                                           ("tokens", b"\x00garbage")])
def test_bundle_corrupt_file_is_named(bundle_dir, tmp_path, kind, content):
    for k, name in BUNDLE_FILES.items():
        if k == kind:
            (tmp_path / name).write_bytes(content)
        else:
            (tmp_path / name).symlink_to(bundle_dir / name)
    with pytest.raises(ModelLoadError, match=BUNDLE_FILES[kind]):
        load_bundle(tmp_path)


def test_demo_format_directory_loads_like_the_shipped_model(tmp_path):
    copy = tmp_path / "my-model"
    shutil.copytree(DEMO_DIR, copy)
    mine, shipped = load_model(f"demo:{copy}"), load_demo()
    assert mine.name == f"demo:{copy}" and shipped.name == "demo"
    assert all(torch.equal(a, b) for a, b in zip(mine.rnnt.state_dict().values(), shipped.rnnt.state_dict().values()))
    assert ServerSettings(model=f"demo:{copy}").model == f"demo:{copy}"
    (copy / "global_stats.json").unlink()
    with pytest.raises(ModelLoadError, match="global_stats.json"):
        load_model(f"demo:{copy}")
    with pytest.raises(ValueError, match="demo directory .* does not exist"):
        ServerSettings(model=f"demo:{tmp_path / 'nowhere'}")
    with pytest.raises(ValueError, match="must be one of"):
        ServerSettings(model="demo-large")


def test_unknown_model_spec():
    with pytest.raises(ModelLoadError, match="unknown model"):
        load_model("gpt")


def test_random_models_are_seeded():
    a, b = load_model("random-small", seed=1), load_model("random-small", seed=1)
    for (name, pa), pb in zip(a.rnnt.state_dict().items(), b.rnnt.state_dict().values()):
        assert torch.equal(pa, pb), name
    c = load_model("random-small", seed=2)
    assert not torch.equal(a.rnnt.joiner.linear.weight, c.rnnt.joiner.linear.weight)


def test_char_tokens_round_trip_and_words():
    t = CharTokenTable.default()
    ids = t.encode("Set a timer  for ten")
    assert t.text(ids) == "set a timer for ten"
    assert t.blank == 28 and t.size == 29
    frames = list(range(len(ids)))
    words = t.words(ids, frames)
    assert [w.text for w in words] == ["set", "a", "timer", "for", "ten"]
    assert words[0] == Word("set", 0, 2) and words[1] == Word("a", 4, 4)
    with pytest.raises(ValueError, match="not in the token table"):
        t.encode("café")


def test_sentencepiece_tokens_text_and_words(bundle_dir):
    t = SentencePieceTokenTable(bundle_dir / BUNDLE_FILES["tokens"])
    ids = t.sp.encode("turn on the kitchen lights")
    assert t.text(ids) == "turn on the kitchen lights"
    assert [w.text for w in t.words(ids, list(range(len(ids))))] == ["turn", "on", "the", "kitchen", "lights"]


def _frames_per_token(engine, method, waveform):
    """Decode ``waveform`` chunk by chunk on one stream; the encoder frame of every token."""
    from server.model.engine import ChunkWork
    from server.model.features import utterance_windows

    stream = engine.new_stream(method, 4)
    for window in utterance_windows(waveform).numpy():
        engine.run_batch([ChunkWork(stream, window)])
    return stream.decoder.best.frames


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_max_symbols_per_frame_caps_what_one_frame_emits(method, speech):
    from collections import Counter

    from server.model.engine import Engine
    from server.types import DecodingMethod
    from tests.conftest import small_model

    decoding = DecodingMethod.GREEDY if method == "greedy" else DecodingMethod.BEAM_SEARCH
    model = small_model()
    with torch.no_grad():  # a blank bias that lets the random joiner emit several symbols per frame
        model.rnnt.joiner.linear.bias[-1] = -1.0
    waveform = torch.from_numpy(speech[0][1])
    free = Counter(_frames_per_token(Engine(model), decoding, waveform))
    capped = Counter(_frames_per_token(Engine(model, max_symbols_per_frame=1), decoding, waveform))
    assert max(free.values()) > 1, "the uncapped decoder should emit several symbols on some frame"
    assert capped and max(capped.values()) == 1
    model.max_symbols_per_frame = 2  # the model's own default applies when the operator gives none
    assert max(Counter(_frames_per_token(Engine(model), decoding, waveform)).values()) == 2


def test_random_base_emits_at_most_one_symbol_per_frame():
    assert load_model("random-base").max_symbols_per_frame == 1
    assert load_model("random-small").max_symbols_per_frame is None


async def test_the_service_builds_its_own_inference_thread_when_given_none():
    """``RecognitionService`` without an executor makes its own engine thread."""
    from server.config import ServerSettings
    from server.core.service import RecognitionService
    from tests.conftest import small_model

    service = RecognitionService(ServerSettings(model="random-small", metrics_port=-1), small_model())
    try:
        assert service.executor is not None
        assert await service.scheduler.run_on_engine_thread(lambda: 6 * 7) == 42
    finally:
        await service.stop()
