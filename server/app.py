"""Assembles the gRPC server: servicers, health, reflection, limits, TLS and token auth;
start, drain (SIGTERM) and stop."""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from asr.v1 import asr_pb2, asr_pb2_grpc
from server import __version__
from server.api import deepgram, google_speech, openai_realtime, riva
from server.api.asr_v1 import AsrServicer
from server.api.auth import HEALTH_SERVICE, TokenAuthInterceptor
from server.api.health import BoundedHealthServicer
from server.api.tls import server_credentials
from server.api.websocket import WebSocketListener
from server.config import ServerSettings, read_tokens
from server.core.memory import return_large_blocks
from server.core.scheduler import engine_thread
from server.core.service import RecognitionService
from server.errors import ASRError, ErrorCode
from server.model.loading import LoadedModel, load_model
from server.observability.metrics import Metrics
from server.observability.observer import Observer
from server.types import LimitReason

log = logging.getLogger(__name__)

ASR_SERVICE = asr_pb2.DESCRIPTOR.services_by_name["SpeechRecognition"].full_name
FINALS_GRACE_S = 5.0  # after --drain-timeout, time for the ended streams' final results
RECEIVE_WINDOW_BYTES = 64 * 1024  # per stream, unread by the server (see the channel options)


def connection_options(s: ServerSettings) -> list[tuple[str, int]]:
    """Keepalive and maximum connection age (docs/scaling.md, "Balancing"). An aged connection
    gets GOAWAY: its open streams run on, for up to the grace period (none given: gRPC's default,
    no limit), and the client opens a new connection for its next streams."""
    ms = lambda seconds: min(int(seconds * 1000), 2**31 - 1)  # noqa: E731
    out = [("grpc.keepalive_timeout_ms", ms(s.keepalive_timeout_seconds)),
           ("grpc.keepalive_permit_without_calls", int(s.keepalive_permit_without_calls))]
    # 0: off (gRPC's own default would ping after 2 hours)
    out.append(("grpc.keepalive_time_ms", ms(s.keepalive_time_seconds) if s.keepalive_time_seconds else 2**31 - 1))
    if s.max_connection_age_seconds > 0:
        out.append(("grpc.max_connection_age_ms", ms(s.max_connection_age_seconds)))
        if s.max_connection_age_grace_seconds > 0:
            out.append(("grpc.max_connection_age_grace_ms", ms(s.max_connection_age_grace_seconds)))
    return out


class AsrServer:
    """A running recognition server (used by ``asr-server`` and by the tests)."""

    def __init__(self, settings: ServerSettings, model: LoadedModel | None = None):
        self.settings = settings
        self.model = model
        self.service: RecognitionService | None = None
        self.server: grpc.aio.Server | None = None
        self.health = BoundedHealthServicer(settings.max_health_watchers)  # Watch streams capped
        self.serving = False  # what health says: SERVING (also on the metrics port's /healthz)
        self.port = 0
        self.metrics: Metrics | None = None  # None when --metrics-port is -1
        self.metrics_port = 0  # the bound /metrics port once started (0: no endpoint)
        self.ws: WebSocketListener | None = None  # None when --ws-port is -1
        self.ws_port = 0  # the bound WebSocket port once started (0: none)

    async def start(self) -> int:
        """Check every option that can fail without the model (TLS files, bearer tokens, both
        ports: bound now), then load and warm up the model and start serving; return the bound
        gRPC port. A bad certificate or a taken port is reported at once, not after loading. On
        any failure what was started is stopped again before the error propagates."""
        try:
            return await self._start()
        except BaseException:
            await self.stop(grace=0)
            raise

    async def _start(self) -> int:
        s = self.settings
        return_large_blocks()  # megabyte messages go back to the OS when freed (server.core.memory)
        credentials = server_credentials(s.tls_cert, s.tls_key, s.tls_client_ca) if s.tls_cert else None
        tokens = read_tokens(s.auth_token_file) if s.auth_token_file is not None else None
        if s.metrics_port >= 0:
            self.metrics = Metrics(version=__version__, model=self.model.name if self.model else s.model,
                                   precision=s.precision, device=s.device)
            self.metrics_port = self.metrics.serve(s.metrics_host, s.metrics_port, lambda: self.serving)
        observer = self.metrics.observer if self.metrics else Observer()
        self.health.observer = observer
        interceptors = []
        if tokens is not None:
            exempt = (HEALTH_SERVICE,) if s.auth_exempt_health else ()
            interceptors.append(TokenAuthInterceptor(tokens, exempt, observer))
            if credentials is None:
                log.warning("--auth-token-file without --tls-cert: bearer tokens cross the network in "
                            "clear text (use TLS, or a TLS-terminating proxy on this host)")
        self.server = grpc.aio.server(interceptors=interceptors, options=[
            # The servicers refuse (and count) messages over --max-message-bytes; gRPC's own
            # check, at twice that, only bounds what a message may cost before they see it.
            ("grpc.max_receive_message_length", max(2 * s.max_message_bytes, s.max_message_bytes + (1 << 20))),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
            # Backpressure: a session that stops reading (--max-buffered-seconds) leaves at most
            # this HTTP/2 stream window (2 s of 16 kHz audio) unread before the client must wait;
            # window auto-tuning (BDP probing) would let megabytes pile up instead.
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", RECEIVE_WINDOW_BYTES),
            # HTTP/2 abuse (docs/operations.md, "HTTP/2 abuse and connection limits"). gRPC core's
            # default is no limit on concurrent streams per connection; with one, a HEADERS beyond
            # it gets RST_STREAM(REFUSED_STREAM) in the transport, before any handler runs
            # (chttp2 parsing.cc, init_header_frame_parser). Without it, a rapid-reset flood on one
            # connection (HEADERS + RST_STREAM pairs) made other clients' new streams fail at once
            # (CANCELLED / INTERNAL); with it they complete (tests/test_http2_abuse.py).
            ("grpc.max_concurrent_streams", s.max_streams_per_connection),
            # ... and a stream the client has reset keeps counting against that limit until the
            # server has freed it ("overload protection", chttp2_transport.cc; on by default in
            # this gRPC but marked experimental, so stated here): resets cannot free slots faster
            # than the server releases the calls.
            ("grpc.http.overload_protection", 1),
            *connection_options(s),
        ])
        address = f"{s.host}:{s.port}" if ":" not in s.host else f"[{s.host}]:{s.port}"
        try:
            port = (self.server.add_secure_port(address, credentials) if credentials is not None
                    else self.server.add_insecure_port(address))
        except RuntimeError as exc:  # grpc raises this for a port it cannot bind
            raise OSError(f"cannot listen on {address} (--host / --port): {exc}") from None
        if port == 0:
            raise OSError(f"cannot listen on {address} (--host / --port)")
        if s.ws_port >= 0:  # bound now (a taken port is reported before loading); 503 until ready
            self.ws = WebSocketListener(s, tokens, (openai_realtime, deepgram), observer)
            self.ws_port = await self.ws.start()
        loop = asyncio.get_running_loop()
        # Every torch operation of the server runs on this one thread (see engine_thread).
        executor = engine_thread()
        if self.model is None:
            self.model = await loop.run_in_executor(executor, load_model, s.model, s.seed)
        self.service = await loop.run_in_executor(executor, RecognitionService, s, self.model, observer, executor)
        if self.metrics:
            self.metrics.watch(self.service)
        await self.service.start()  # warms the model up: health says SERVING only after this
        asr_pb2_grpc.add_SpeechRecognitionServicer_to_server(AsrServicer(self.service), self.server)
        compat_services = [add(self.service, self.server)  # Riva and Google Cloud Speech v1
                           for add in (riva.add_to_server, google_speech.add_to_server)]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [ASR_SERVICE, *compat_services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], self.server)
        await self.server.start()
        self.port = port
        if self.ws is not None:
            self.ws.service = self.service  # the WebSocket port now admits streams
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s (%s, %.1f M parameters, %s) on %s:%d (%s%s)", self.model.name, s.precision,
                 self.model.num_parameters / 1e6, s.device, s.host, self.port,
                 "mutual TLS" if s.tls_client_ca else "TLS" if s.tls_cert else "plaintext",
                 ", bearer tokens" if s.auth_token_file else "")
        if self.ws is not None:
            log.info("WebSocket API on %s:%d: OpenAI Realtime at /v1/realtime, Deepgram at /v1/listen",
                     s.host, self.ws_port)
        return self.port

    async def _set_health(self, status) -> None:
        self.serving = status == health_pb2.HealthCheckResponse.SERVING
        for name in ("", ASR_SERVICE):
            result = self.health.set(name, status)
            if asyncio.iscoroutine(result):
                await result

    async def drain(self, timeout: float) -> bool:
        """Graceful shutdown, first part: health says NOT_SERVING and new streams get UNAVAILABLE
        at once; open streams run to their end for up to ``timeout`` seconds, then each still
        sending gets its final result and ends UNAVAILABLE (``FINALS_GRACE_S`` for those).
        Returns whether every stream ended by itself. Call ``stop`` afterwards."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        sessions = self.service.sessions
        sessions.draining = True
        log.info("draining: %d streams open, waiting up to %g s for them to end", sessions.active, timeout)
        if await sessions.wait_until_empty(timeout):
            return True
        ended = sessions.end_all(ASRError(
            ErrorCode.UNAVAILABLE, f"the server is shutting down: the stream was ended after "
            f"--drain-timeout ({timeout:g} s), after the final result of the audio received so far; "
            f"reconnect to go on"), LimitReason.DRAINING)
        log.info("drain timeout: ended %d streams after their final results", ended)
        await sessions.wait_until_empty(FINALS_GRACE_S)
        return False

    async def stop(self, grace: float | None = 1.0) -> None:
        if self.server is not None:
            await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            await self.server.stop(grace)
            self.server = None
        if self.ws is not None:
            await self.ws.stop()  # closes its connections (1001); their sessions end with them
            self.ws = None
            self.ws_port = 0
        if self.service is not None:
            await self.service.stop()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics_port = 0

    async def wait(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()

    @property
    def active_sessions(self) -> int:
        return self.service.sessions.active if self.service else 0
