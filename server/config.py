"""Typed configuration: server settings (flags + ``ASR_*`` environment) and the token file.

``ServerSettings`` is the single source of every server option: ``asr-server
--help`` is generated from it, each option is also read from the environment
variable ``ASR_<OPTION>``, and values are validated at start-up (an invalid
value stops the server with a message naming the option).

A request's recognition config is ``server.types.StreamConfig``, validated against
these settings' limits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


MIN_TOKEN_LENGTH = 16


def read_tokens(path: Path) -> list[str]:
    """The tokens of a token file: one per line, blank lines and ``#`` comments ignored.
    Raises ``ValueError`` naming the line (never its content) for a malformed token."""
    tokens = []
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--auth-token-file {str(path)!r} cannot be read: {type(exc).__name__}") from None
    for number, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if not (token.isascii() and token.isprintable()) or any(ch.isspace() for ch in token):
            raise ValueError(f"--auth-token-file line {number}: a token is printable ASCII without spaces")
        if len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(f"--auth-token-file line {number}: a token needs at least {MIN_TOKEN_LENGTH} "
                             f"characters")
        tokens.append(token)
    if not tokens:
        raise ValueError(f"--auth-token-file {str(path)!r} holds no token")
    return tokens


class ServerSettings(BaseSettings):
    """Every option of ``asr-server``."""

    model_config = SettingsConfigDict(
        env_prefix="ASR_", cli_kebab_case=True, cli_prog_name="asr-server",
        cli_implicit_flags=True, extra="forbid")

    # --- network -------------------------------------------------------------------------
    host: str = Field("0.0.0.0", description="address the gRPC server listens on")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 picks a free port)")
    ws_port: int = Field(-1, ge=-1, le=65535, description="WebSocket port on --host for OpenAI Realtime "
                         "(/v1/realtime) and Deepgram (/v1/listen) clients, with the gRPC port's TLS, tokens "
                         "and limits (0 picks a free port, -1 turns it off)")
    ws_allow_origin: list[str] = Field([], description="a browser origin "
                                       "(https://app.example:8443) whose pages may use the WebSocket port, "
                                       "besides the server's own page at GET /; repeatable (default: none)")
    ws_token_ttl_seconds: float = Field(60.0, ge=1.0, le=3600.0, description="how long a token minted by "
                                        "POST /v1/auth/grant (Deepgram) or /v1/realtime/transcription_sessions "
                                        "(OpenAI) may open its one WebSocket connection")
    ws_browser_max_message_bytes: int = Field(64 * 1024, ge=1024, le=64 * 1024 * 1024, description="largest "
                                              "message of a browser page's WebSocket connection (one with an "
                                              "Origin header)")
    ws_browser_max_messages_per_second: int = Field(50, ge=1, le=100_000, description="messages a second a "
                                                    "browser page's WebSocket connection may send (a second's "
                                                    "worth at once)")
    ws_max_keepalive_seconds: float = Field(300.0, gt=0.0, le=86_400.0, description="Deepgram KeepAlive "
                                            "holds a stream open without audio for at most this long since its "
                                            "last audio (or its opening); the next KeepAlive after it ends the "
                                            "stream with its final result, then OUT_OF_RANGE (close code 1008)")
    # --- model ---------------------------------------------------------------------------
    model: str = Field("demo", description="model: demo (embedded), random-base, random-base-moe (full size, "
                       "random weights, for benchmarks; -moe: MoE feed-forward), random-small (tiny, for tests), "
                       "demo:DIR (train/ exports) or bundle:DIR (torchaudio's files)")
    seed: int = Field(0, description="seed of the random-* models")
    precision: Literal["fp32", "bf16", "fp16", "int8"] = Field(
        "fp32", description="numeric precision of the model, applied once at load time: fp32; bf16 "
        "(weights and activations); int8 (every Linear dynamically quantised); fp16 (CUDA only: "
        "slower than bf16 on CPU, refused there)")
    int8_kernel: Literal["rowwise", "fbgemm"] = Field(
        "rowwise", description="int8 products: rowwise (a scale per activation row: a stream's "
        "result never depends on its batch) or fbgemm (torch's quantize_dynamic, one scale per batch: "
        "it can)")
    kernels: Literal["auto", "avx512", "avx2", "portable", "torch"] = Field(
        "auto", description="kernel back end, built at install: auto (the best this CPU runs), "
        "avx512, avx2, portable (plain C++) or torch (no native code); one this CPU cannot run stops the "
        "server (README, Kernels)")
    max_precision_error: float = Field(
        0.1, gt=0, le=1.0, description="start-up self-check: largest relative error of the encoder "
        "output in the chosen precision against fp32, on a fixed input; above it the server refuses "
        "to start")
    device: Literal["cpu", "cuda"] = Field("cpu", description="where the model runs")
    threads: int = Field(0, ge=0, description="torch intra-op threads of the inference thread "
                         "(0: one per core, or 1 while another process on the cores slows every step; "
                         "docs/operations.md)")
    # --- decoding ------------------------------------------------------------------------
    decoding_method: Literal["greedy", "beam"] = Field(
        "greedy", description="decoding used when a request does not choose one")
    beam_width: int = Field(4, ge=1, le=64, description="beam width used when a request asks for "
                            "beam search without a width")
    max_beam_width: int = Field(16, ge=1, le=64, description="largest beam width a request may ask for")
    beam_search: Literal["torchaudio", "modified"] = Field(
        "torchaudio", description="beam search: torchaudio (its RNNTBeamSearch, exactly) or modified "
        "(k2's: one symbol per 40 ms frame, for sub-word models; docs/architecture.md)")
    max_symbols_per_frame: int = Field(
        0, ge=0, le=100, description="most symbols one 40 ms frame may emit (0: the model's default: 10 "
        "greedy, 100 beam, 1 for random-base, whose random joiner would emit up to the cap)")
    endpoint_silence_ms: int = Field(800, ge=80, le=60_000, description="trailing non-speech that "
                                     "ends an utterance (a final result), unless a request sets its own")
    max_utterance_ms: int = Field(30_000, ge=1000, le=600_000, description="longest utterance before "
                                  "a final result is forced, unless a request sets its own")
    # --- contextual biasing --------------------------------------------------------------
    max_phrases: int = Field(500, ge=0, le=100_000, description="most phrases (contextual biasing) one "
                             "request may carry, all its speech contexts together (0: none); more get "
                             "INVALID_ARGUMENT")
    max_phrase_chars: int = Field(50, ge=1, le=10_000, description="longest phrase, in characters; a longer "
                                  "one gets INVALID_ARGUMENT")
    min_boost: float = Field(0.1, gt=0.0, le=1000.0, description="smallest boost a speech context may ask "
                             "for (bonus per token of a phrase, in log-probability units)")
    max_boost: float = Field(20.0, gt=0.0, le=1000.0, description="largest boost a speech context may ask for")
    default_boost: float = Field(1.0, gt=0.0, le=1000.0, description="boost of a speech context that sets none "
                                 "(0); 1 keeps ordinary WER within 0.3 points with 100 phrases")
    # --- batching ------------------------------------------------------------------------
    max_batch: int = Field(32, ge=1, le=1024, description="most streams in one engine step")
    max_wait_ms: float = Field(0.0, ge=0.0, le=100.0, description="how long a step may wait to fill "
                               "a batch once the engine is free (0: never wait)")
    # --- limits --------------------------------------------------------------------------
    max_streams: int = Field(0, ge=0, description="concurrent streams admitted; further ones get "
                             "RESOURCE_EXHAUSTED (0: unlimited)")
    max_streams_per_client: int = Field(0, ge=0, description="concurrent streams one client may hold: "
                                        "one bearer token with --auth-token-file, else one peer address "
                                        "(0: unlimited); further ones get RESOURCE_EXHAUSTED")
    max_streams_per_connection: int = Field(1000, ge=1, le=2**31 - 1, description="concurrent HTTP/2 "
                                            "streams one connection may open (SETTINGS_MAX_CONCURRENT_STREAMS); "
                                            "more get RST_STREAM(REFUSED_STREAM) (docs/operations.md, HTTP/2 abuse)")
    max_health_watchers: int = Field(1000, ge=0, description="concurrent grpc.health.v1 Watch streams "
                                     "(10-20 KB each, token-less by default); further ones get "
                                     "RESOURCE_EXHAUSTED (0: unlimited; Health.Check is never limited)")
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024,
                                   description="largest request message accepted")
    max_stream_seconds: float = Field(3600.0, gt=0, description="longest stream, in seconds of audio; "
                                      "beyond it the stream gets its final result, then OUT_OF_RANGE")
    max_buffered_seconds: float = Field(10.0, gt=0.5, le=600.0, description="audio a stream may send "
                                        "ahead of recognition before the server stops reading "
                                        "(gRPC flow control then slows the client)")
    latency_budget_ms: float = Field(160.0, ge=0.0, le=10_000.0, description="load shedding: a new stream "
                                     "is refused (RESOURCE_EXHAUSTED) when the measured step cost predicts "
                                     "one more would push chunk latency over this (0: off)")
    idle_timeout_seconds: float = Field(30.0, gt=0.0, le=86_400.0, description="a stream that sends no "
                                        "audio (or no config) for this long gets its final result and ends "
                                        "with OUT_OF_RANGE")
    min_audio_rate: float = Field(0.5, ge=0.0, le=1.0, description="slowest pace of audio, as a share "
                                  "of real time, that keeps a stream open: each second of audio buys "
                                  "1 / this seconds of waiting, up to --idle-timeout-seconds (0: off)")
    drain_timeout: float = Field(20.0, ge=0.0, le=86_400.0, description="on SIGTERM, seconds the open "
                                 "streams may run to their end; then each gets its final result and ends "
                                 "with UNAVAILABLE (new streams are refused at once)")
    # --- connections in a fleet ------------------------------------------------------------
    keepalive_time_seconds: float = Field(60.0, ge=0.0, le=86_400.0, description="HTTP/2 PING to a client "
                                          "after this long without activity on its connection, to find "
                                          "connections whose peer is gone (0: off)")
    keepalive_timeout_seconds: float = Field(20.0, gt=0.0, le=3600.0, description="a keepalive PING "
                                             "unanswered for this long closes the connection")
    keepalive_permit_without_calls: bool = Field(False, description="keepalive PINGs on connections with "
                                                 "no call open too, both ways: the server sends them, and "
                                                 "clients' PINGs on such connections are not counted as abuse")
    max_connection_age_seconds: float = Field(0.0, ge=0.0, le=86_400.0, description="a connection older than "
                                              "this (plus or minus 10 %) gets GOAWAY: its open streams go on, new "
                                              "ones go over a new connection (0: off; docs/scaling.md)")
    max_connection_age_grace_seconds: float = Field(0.0, ge=0.0, le=86_400.0, description="after GOAWAY, how "
                                                    "long the streams open on the aged connection may still run "
                                                    "before it is closed under them (0: as long as they last)")
    # --- security ------------------------------------------------------------------------
    tls_cert: Optional[Path] = Field(None, description="PEM certificate chain of the server; with "
                                     "--tls-key the gRPC port speaks TLS only")
    tls_key: Optional[Path] = Field(None, description="PEM private key of --tls-cert")
    tls_client_ca: Optional[Path] = Field(None, description="PEM CA certificates: clients must present "
                                          "a certificate signed by one of them (mutual TLS)")
    auth_token_file: Optional[Path] = Field(None, description="file of accepted bearer tokens, one per "
                                            "line (# comments): every call must send 'authorization: "
                                            "Bearer TOKEN', else UNAUTHENTICATED")
    auth_exempt_health: bool = Field(True, description="grpc.health.v1 answers without a token (for "
                                     "load-balancer probes)")
    # --- observability -------------------------------------------------------------------
    metrics_port: int = Field(9400, ge=-1, le=65535, description="port of the Prometheus /metrics "
                              "endpoint (0 picks a free port, -1 turns the endpoint off)")
    metrics_host: str = Field("127.0.0.1", min_length=1, description="address the /metrics endpoint "
                              "listens on: this host only by default; 0.0.0.0 or an internal interface "
                              "for a Prometheus elsewhere (the container image sets 0.0.0.0)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    gc_freeze: bool = Field(True, description="once loaded and warm, exempt the start-up heap (torch, "
                            "gRPC, the model) from Python's garbage collector, whose full collections "
                            "otherwise stall every stream for 50-150 ms (asr-server only)")

    @field_validator("ws_allow_origin")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            parts = urlsplit(origin.strip())
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
                    or parts.query or parts.fragment or parts.username:
                raise ValueError(f"not an http(s) origin such as https://app.example:8443: {origin!r}")
        return value

    @field_validator("model")
    @classmethod
    def _check_model(cls, v: str) -> str:
        from server.model.loading import DIRECTORY_SOURCES, MODEL_CHOICES

        source = next((prefix for prefix in DIRECTORY_SOURCES if v.startswith(prefix)), None)
        if source is None and v not in MODEL_CHOICES:
            raise ValueError(f"must be one of {', '.join(MODEL_CHOICES)}")
        if source is not None and not Path(v[len(source):]).expanduser().is_dir():
            raise ValueError(f"{source[:-1]} directory {v[len(source):]!r} does not exist")
        return v

    @field_validator("kernels")
    @classmethod
    def _check_kernels(cls, v: str) -> str:
        from server.kernels.native import KernelError, resolve

        try:
            resolve(v)
        except KernelError as e:
            raise ValueError(str(e).removeprefix(f"--kernels {v} ")) from None
        return v

    @model_validator(mode="after")
    def _check_beam(self) -> "ServerSettings":
        if self.beam_width > self.max_beam_width:
            raise ValueError(f"--beam-width ({self.beam_width}) exceeds --max-beam-width "
                             f"({self.max_beam_width})")
        return self

    @model_validator(mode="after")
    def _check_boost(self) -> "ServerSettings":
        if not self.min_boost <= self.default_boost <= self.max_boost:
            raise ValueError(f"--default-boost ({self.default_boost:g}) must lie within --min-boost "
                             f"({self.min_boost:g}) and --max-boost ({self.max_boost:g})")
        return self

    @model_validator(mode="after")
    def _check_security(self) -> "ServerSettings":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS)")
        for option, path in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key),
                             ("--tls-client-ca", self.tls_client_ca), ("--auth-token-file", self.auth_token_file)):
            if path is not None and not path.expanduser().is_file():
                raise ValueError(f"{option}: {str(path)!r} is not a readable file")
        if self.auth_token_file is not None:
            read_tokens(self.auth_token_file)  # raises ValueError naming the problem, never a token
        return self


def _describe_env_vars() -> None:
    """Append each option's environment variable to its help text."""
    for name, info in ServerSettings.model_fields.items():
        info.description = f"{info.description} [env ASR_{name.upper()}]"
    ServerSettings.model_rebuild(force=True)


_describe_env_vars()


