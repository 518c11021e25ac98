"""Model sources behind one loader: ``demo``, ``demo:DIR``, ``random-base``, ``random-small``,
``bundle:DIR``.

Every source yields a ``LoadedModel``: a torchaudio Emformer RNN-T in eval mode,
its feature normalisation stats and its token table. Nothing is downloaded:
``bundle:DIR`` reads torchaudio's three LibriSpeech files from a local directory;
``demo:DIR`` a model in the demo model's format (``train/train_demo.py --export DIR``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torchaudio

from server.model.features import GlobalStats
from server.model.moe import MOE_FIELDS, moeify
from server.model.vocabulary import CharTokenTable, SentencePieceTokenTable, SyntheticTokenTable, TokenTable

# The shipped demo model: package data (in the source tree a link to models/demo, where its card lives)
DEMO_DIR = Path(__file__).resolve().parent / "demo"

BUNDLE_FILES = {
    "weights": "emformer_rnnt_base_librispeech.pt",
    "stats": "global_stats_rnnt_librispeech.json",
    "tokens": "spm_bpe_4096_librispeech.model",
}
BUNDLE_URL = "https://download.pytorch.org/torchaudio/"
BUNDLE_URL_PATHS = {
    "weights": "models/emformer_rnnt_base_librispeech.pt",
    "stats": "pipeline-assets/global_stats_rnnt_librispeech.json",
    "tokens": "pipeline-assets/spm_bpe_4096_librispeech.model",
}


class ModelLoadError(Exception):
    """A model source is missing, incomplete or corrupt; the message names the file."""


@dataclass(frozen=True)
class ModelConfig:
    """Arguments of ``torchaudio.models.emformer_rnnt_model`` (all fixed by the checkpoint)."""

    input_dim: int = 80
    encoding_dim: int = 1024
    num_symbols: int = 4097
    segment_length: int = 16
    right_context_length: int = 4
    time_reduction_input_dim: int = 128
    time_reduction_stride: int = 4
    transformer_num_heads: int = 8
    transformer_ffn_dim: int = 2048
    transformer_num_layers: int = 20
    transformer_dropout: float = 0.1
    transformer_activation: str = "gelu"
    transformer_left_context_length: int = 30
    transformer_max_memory_size: int = 0
    transformer_weight_init_scale_strategy: str = "depthwise"
    transformer_tanh_on_mem: bool = True
    symbol_embedding_dim: int = 512
    num_lstm_layers: int = 3
    lstm_layer_norm: bool = True
    lstm_layer_norm_epsilon: float = 1e-3
    lstm_dropout: float = 0.3
    # Mixture-of-Experts feed-forward (``server.model.moe``): experts per Emformer layer (0: the
    # dense feed-forward of ``transformer_ffn_dim``), experts per frame, each expert's hidden width
    moe_experts: int = 0
    moe_top_k: int = 0
    moe_ffn_dim: int = 0

    def build(self) -> torchaudio.models.RNNT:
        if self.transformer_max_memory_size != 0:
            raise ModelLoadError("Emformer memory banks (max_memory_size > 0) are not supported")
        if (self.segment_length, self.right_context_length, self.time_reduction_stride) != (16, 4, 4):
            raise ModelLoadError("the streaming front end needs segment 16, right context 4, stride 4")
        arguments = dataclasses.asdict(self)
        moe = {name: arguments.pop(name) for name in MOE_FIELDS}
        if moe["moe_experts"] < 0:
            raise ModelLoadError(f"moe_experts must be 0 (dense) or more, not {self.moe_experts}")
        rnnt = torchaudio.models.emformer_rnnt_model(**arguments)
        if self.moe_experts:
            if not 1 <= self.moe_top_k <= self.moe_experts:
                raise ModelLoadError(f"moe_top_k must be between 1 and moe_experts ({self.moe_experts}), "
                                     f"not {self.moe_top_k}")
            if self.moe_ffn_dim < 1:
                raise ModelLoadError(f"moe_ffn_dim must be positive, not {self.moe_ffn_dim}")
            moeify(rnnt, self.moe_experts, self.moe_top_k, self.moe_ffn_dim)
        return rnnt

    @classmethod
    def from_json(cls, path: Path) -> "ModelConfig":
        with open(path) as f:
            return cls(**json.load(f))


BASE_CONFIG = ModelConfig()
# The base model with a Mixture-of-Experts feed-forward of the same active parameters per frame:
# 8 experts of 1024 per layer, 2 per frame (docs/moe.md).
BASE_MOE_CONFIG = dataclasses.replace(BASE_CONFIG, moe_experts=8, moe_top_k=2, moe_ffn_dim=1024)
# Same structure as the base model at a few percent of its size: fast tests.
SMALL_CONFIG = ModelConfig(
    encoding_dim=128, num_symbols=29, time_reduction_input_dim=32, transformer_num_heads=4,
    transformer_ffn_dim=256, transformer_num_layers=3, symbol_embedding_dim=64, num_lstm_layers=2)

# Blank biases that give about one token per 2-5 encoder frames on speech (seed 0).
RANDOM_BASE_BLANK_BIAS = 2.0
RANDOM_SMALL_BLANK_BIAS = 0.6
# random-base emits at most one symbol per 40 ms frame. With the usual cap (10) it emits
# 30-40 tokens in the first two chunks of every utterance and none after (measured on
# bench/audio: 2.7 tokens per chunk, bursts of 40), which makes a step with a new stream
# cost 30+ decoder rounds, 150 ms in fp32; no trained model decodes like that (the demo
# model: 1.7 characters per chunk, a BPE-4096 model about 0.6 tokens). With the cap at
# 1: 1.3 tokens per chunk, at most 4, a decoder load between the two.
RANDOM_BASE_MAX_SYMBOLS = 1


@dataclass
class LoadedModel:
    """A model ready for the engine: weights in eval mode, stats, tokens, provenance."""

    name: str
    config: ModelConfig
    rnnt: torchaudio.models.RNNT
    stats: GlobalStats
    tokens: TokenTable
    # Decoding default: most non-blank symbols one encoder frame may emit (greedy and beam);
    # None leaves the decoders' own caps (greedy 10, beam torchaudio's 100).
    max_symbols_per_frame: int | None = None

    @property
    def blank(self) -> int:
        return self.tokens.blank

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.rnnt.parameters())


def random_model(config: ModelConfig, seed: int = 0, blank_bias: float = 0.0,
                 tokens: TokenTable | None = None, name: str = "random",
                 max_symbols_per_frame: int | None = None) -> LoadedModel:
    """Seeded random weights; the joiner's bias is zero except ``blank_bias`` on the blank.

    With random weights the joiner's own random bias decides nearly every frame (a
    non-blank token, up to the symbol cap); a trained model emits one token every
    few frames. The blank bias restores that sparsity on average (values chosen by
    measurement on the bundled samples). It cannot restore the timing: from the
    start state a random predictor runs into a token that re-selects itself, so it
    emits up to the symbol cap on its first frames and then nothing (the endpointer
    then restarts it); ``max_symbols_per_frame`` bounds those bursts (see
    ``RANDOM_BASE_MAX_SYMBOLS``).
    """
    with torch.random.fork_rng(devices=[]):  # seeded weights; torch's global random state left as it was
        torch.manual_seed(seed)
        rnnt = config.build().eval()
    with torch.no_grad():
        rnnt.joiner.linear.bias.zero_()
        rnnt.joiner.linear.bias[config.num_symbols - 1] = blank_bias
    return LoadedModel(name, config, rnnt, GlobalStats.identity(),
                       tokens or SyntheticTokenTable(config.num_symbols), max_symbols_per_frame)


def _load_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for truncated/corrupt files
        raise ModelLoadError(f"cannot read model weights {path}: {exc}") from None


def _apply_weights(config: ModelConfig, state_dict: dict, path: Path) -> torchaudio.models.RNNT:
    rnnt = config.build()
    try:
        rnnt.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise ModelLoadError(f"{path} does not match the model architecture: {exc}") from None
    return rnnt.eval()


def load_bundle(directory: Path) -> LoadedModel:
    """torchaudio's EMFORMER_RNNT_BASE_LIBRISPEECH files, from a local directory."""
    paths = {k: directory / v for k, v in BUNDLE_FILES.items()}
    for kind, path in paths.items():
        if not path.is_file():
            raise ModelLoadError(
                f"bundle file missing: {path} (download {BUNDLE_URL}{BUNDLE_URL_PATHS[kind]})")
    try:
        stats = GlobalStats.load(paths["stats"])
    except (ValueError, KeyError, OSError) as exc:
        raise ModelLoadError(f"corrupt global stats file {paths['stats']}: {exc}") from None
    try:
        tokens = SentencePieceTokenTable(paths["tokens"])
    except Exception as exc:
        raise ModelLoadError(f"corrupt SentencePiece model {paths['tokens']}: {exc}") from None
    config = dataclasses.replace(BASE_CONFIG, num_symbols=tokens.size)
    rnnt = _apply_weights(config, _load_state_dict(paths["weights"]), paths["weights"])
    return LoadedModel(f"bundle:{directory}", config, rnnt, stats, tokens)


def load_demo(directory: Path = DEMO_DIR) -> LoadedModel:
    """The project's small trained model (``models/demo``), or one exported in its format."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"demo model config not found: {config_path}")
    for name in ("tokens.txt", "global_stats.json", "model.pt"):
        if not (directory / name).is_file():
            raise ModelLoadError(f"demo-format model file missing: {directory / name}")
    config = ModelConfig.from_json(config_path)
    tokens = CharTokenTable.load(directory / "tokens.txt")
    stats = GlobalStats.load(directory / "global_stats.json")
    rnnt = _apply_weights(config, _load_state_dict(directory / "model.pt"), directory / "model.pt")
    return LoadedModel("demo" if directory == DEMO_DIR else f"demo:{directory}", config, rnnt, stats, tokens)


MODEL_CHOICES = ("demo", "random-base", "random-base-moe", "random-small", "demo:DIR", "bundle:DIR")
DIRECTORY_SOURCES = ("demo:", "bundle:")  # the specs that name a directory


def load_model(spec: str, seed: int = 0) -> LoadedModel:
    """Load a model by its ``--model`` spec (see ``MODEL_CHOICES``)."""
    if spec == "demo":
        return load_demo()
    if spec == "random-base":
        return random_model(BASE_CONFIG, seed, blank_bias=RANDOM_BASE_BLANK_BIAS, name="random-base",
                            max_symbols_per_frame=RANDOM_BASE_MAX_SYMBOLS)
    if spec == "random-base-moe":
        return random_model(BASE_MOE_CONFIG, seed, blank_bias=RANDOM_BASE_BLANK_BIAS, name="random-base-moe",
                            max_symbols_per_frame=RANDOM_BASE_MAX_SYMBOLS)
    if spec == "random-small":
        return random_model(SMALL_CONFIG, seed, blank_bias=RANDOM_SMALL_BLANK_BIAS,
                            tokens=CharTokenTable.default(), name="random-small")
    if spec.startswith("bundle:"):
        return load_bundle(Path(spec[len("bundle:"):]).expanduser())
    if spec.startswith("demo:"):
        return load_demo(Path(spec[len("demo:"):]).expanduser())
    raise ModelLoadError(f"unknown model {spec!r}; choose one of {', '.join(MODEL_CHOICES)}")
