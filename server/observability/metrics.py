"""Prometheus metrics of the server: the only module that imports prometheus_client.

``PrometheusObserver`` implements the ``server.observability.observer.Observer`` hooks the hot path
calls and maps them onto metrics; ``Metrics`` owns a private registry (so several
servers can live in one process, as in the tests), the live gauges read at scrape
time and the HTTP endpoint: ``/metrics``, and ``/healthz`` for proxies that check over HTTP/1.

Conventions: ``asr_<what>_<unit>``, base units (seconds), counters end in
``_total``; every label value comes from a closed set in ``server.observability.observer`` and is
initialised at start-up, so each series exists (at 0) before anything happens;
histogram buckets are placed for a 160 ms chunk period. The table of metrics is
in the README (section "Metrics"); ``METRIC_NAMES`` lists them for the tests.
"""

from __future__ import annotations

import socket
import threading
from typing import TYPE_CHECKING, Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, make_server

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from server.errors import ErrorCode
from server.observability.gc_pauses import GcPauseTimer
from server.observability.observer import EngineLoad, Observer
from server.types import (KNOWN_APIS, OTHER_API, SAMPLE_RATE, SEGMENT_SAMPLES, FinalTrigger, LimitReason,
                          StreamOutcome, api_label)

if TYPE_CHECKING:
    from server.core.service import RecognitionService
    from server.types import BatchRecord, StepStats, StreamStats

# The exposition carries no ``*_created`` series: they double the output and no query here uses them.
prometheus_client.disable_created_metrics()

CHUNK_SECONDS = SEGMENT_SAMPLES / SAMPLE_RATE  # 0.16 s: one model step of one stream
API_LABELS = (*KNOWN_APIS, OTHER_API)
ENGINE_STAGES = ("features", "encoder", "decoder")
ERROR_CODES = tuple(code.name for code in ErrorCode)

# Buckets, in seconds unless said otherwise. Chunk latency must stay under the 160 ms chunk
# period; resolution is finest from 10 ms to 200 ms and coarse beyond (overload).
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.12, 0.14, 0.16, 0.2, 0.25,
                   0.32, 0.4, 0.5, 0.75, 1.0, 2.0, 5.0)
QUEUE_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.12, 0.16, 0.24, 0.32,
                      0.64, 1.28, 2.56)
STEP_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.12, 0.16, 0.2,
                0.32, 0.5, 1.0)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024)  # streams
# First result: at least one 160 ms chunk + 40 ms look-ahead of audio at real-time pace.
FIRST_RESULT_BUCKETS = (0.02, 0.05, 0.1, 0.16, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0,
                        3.0, 5.0, 10.0)
FINAL_BUCKETS = (0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.16, 0.2, 0.25, 0.32, 0.4, 0.5, 0.75, 1.0,
                 2.0, 5.0, 10.0)
GC_PAUSE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
GC_GENERATIONS = ("0", "1", "2")
RTF_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)  # ratio

METRIC_NAMES = (
    "asr_build_info", "asr_chunk_latency_seconds", "asr_queue_wait_seconds", "asr_engine_step_seconds",
    "asr_engine_stage_seconds", "asr_batch_size", "asr_time_to_first_result_seconds",
    "asr_final_result_latency_seconds", "asr_stream_rtf", "asr_engine_rtf", "asr_engine_busy_seconds_total",
    "asr_engine_step_failures_total", "asr_active_streams", "asr_scheduler_queue_depth",
    "asr_streams_total", "asr_audio_seconds_total", "asr_errors_total", "asr_limit_hits_total",
    "asr_gc_pause_seconds",
)


class PrometheusObserver(Observer):
    """Maps the hot path's observations (``server.observability.observer.Observer``) onto metrics in ``registry``."""

    def __init__(self, registry: CollectorRegistry, engine_rtf_window_s: float = 10.0):
        r = registry
        self.engine_load = EngineLoad(engine_rtf_window_s)
        self.chunk_latency = Histogram(
            "asr_chunk_latency_seconds", "From the arrival of the last audio sample a chunk needed "
            "(40 ms look-ahead included) to its result: the server's part of the chunk latency",
            buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "asr_queue_wait_seconds", "Time a ready chunk waited for the engine",
            buckets=QUEUE_WAIT_BUCKETS, registry=r)
        self.engine_step = Histogram(
            "asr_engine_step_seconds", "Wall time of one batched engine step (features, encoder, decoders)",
            buckets=STEP_BUCKETS, registry=r)
        self.engine_stage = Histogram(
            "asr_engine_stage_seconds", "Wall time of one stage of a batched engine step",
            ["stage"], buckets=STEP_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "asr_batch_size", "Streams in one engine step", buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.time_to_first_result = Histogram(
            "asr_time_to_first_result_seconds", "From a stream's first audio to its first result "
            "(interim, or final when interim results are off)", buckets=FIRST_RESULT_BUCKETS, registry=r)
        self.final_latency = Histogram(
            "asr_final_result_latency_seconds", "From the moment the server had all audio a final result "
            "needed (endpoint: the chunk that completed it; end_of_stream: the client's half-close) "
            "to the final result", ["trigger"], buckets=FINAL_BUCKETS, registry=r)
        self.stream_rtf = Histogram(
            "asr_stream_rtf", "Real-time factor of a stream, observed when it ends: its share of the "
            "batched compute / its audio duration", buckets=RTF_BUCKETS, registry=r)
        self.engine_busy = Counter(
            "asr_engine_busy_seconds", "Time the engine spent in batched steps "
            "(its rate is the engine's utilisation)", registry=r)
        self.step_failures = Counter(
            "asr_engine_step_failures", "Engine steps that raised (their streams ended with INTERNAL)",
            registry=r)
        self.streams = Counter(
            "asr_streams", "Streams (streaming calls and unary Recognize) that ended, by protocol and "
            "outcome; rejected: refused at admission", ["api", "outcome"], registry=r)
        self.audio = Counter(
            "asr_audio_seconds", "Audio recognised, in seconds", ["api"], registry=r)
        self.errors = Counter(
            "asr_errors", "RPCs that ended with a non-OK status, by gRPC status code", ["code"], registry=r)
        self.limit_hits = Counter(
            "asr_limit_hits", "Requests refused or slowed by a limit, by limit", ["reason"], registry=r)
        # Every labelled series exists from the start (at 0), so rates and ratios are defined.
        for stage in ENGINE_STAGES:
            self.engine_stage.labels(stage)
        for trigger in FinalTrigger:
            self.final_latency.labels(trigger.value)
        for api in API_LABELS:
            self.audio.labels(api)
            for outcome in StreamOutcome:
                self.streams.labels(api, outcome.value)
        for code in ERROR_CODES:
            self.errors.labels(code)
        for reason in LimitReason:
            self.limit_hits.labels(reason.value)

    # --- Observer hooks ------------------------------------------------------------------
    def chunk_done(self, api: str, latency_s: float, queue_wait_s: float, audio_s: float) -> None:
        self.chunk_latency.observe(latency_s)
        self.queue_wait.observe(max(0.0, queue_wait_s))
        if audio_s > 0:
            self.audio.labels(api_label(api)).inc(audio_s)

    def first_result(self, api: str, seconds: float) -> None:
        self.time_to_first_result.observe(seconds)

    def final_result(self, api: str, trigger: FinalTrigger, seconds: float) -> None:
        self.final_latency.labels(trigger.value).observe(seconds)

    def stream_ended(self, api: str, outcome: StreamOutcome, stats: StreamStats | None) -> None:
        self.streams.labels(api_label(api), outcome.value).inc()
        if stats is not None and stats.chunks and stats.audio_seconds > 0:
            self.stream_rtf.observe(stats.rtf)

    def batch_done(self, record: BatchRecord, step: StepStats | None) -> None:
        self.engine_step.observe(record.seconds)
        self.batch_size.observe(record.size)
        self.engine_busy.inc(record.seconds)
        self.engine_load.add(record.seconds, record.size * CHUNK_SECONDS)
        if record.failed:
            self.step_failures.inc()
        if step is not None:
            self.engine_stage.labels("features").observe(step.features)
            self.engine_stage.labels("encoder").observe(step.encoder)
            self.engine_stage.labels("decoder").observe(step.decoder)

    def limit_hit(self, reason: LimitReason) -> None:
        self.limit_hits.labels(reason.value).inc()

    def error_returned(self, code: ErrorCode) -> None:
        self.errors.labels(code.name).inc()


class _LiveGauges(Collector):
    """Gauges read from the service at scrape time (nothing to keep in step)."""

    def __init__(self, observer: PrometheusObserver):
        self.observer = observer
        self.service: RecognitionService | None = None

    def collect(self) -> Iterable[GaugeMetricFamily]:
        active = GaugeMetricFamily("asr_active_streams", "Streams open now, by protocol", labels=["api"])
        counts = dict.fromkeys(API_LABELS, 0)
        if self.service is not None:
            for api, n in self.service.sessions.active_by_api().items():
                counts[api_label(api)] += n
        for api, n in counts.items():
            active.add_metric([api], n)
        yield active
        depth = self.service.scheduler.queue_depth if self.service is not None else 0
        yield GaugeMetricFamily("asr_scheduler_queue_depth", "Ready chunks waiting for the engine", value=depth)
        yield GaugeMetricFamily(
            "asr_engine_rtf", f"Recent real-time factor of the engine: busy time / audio advanced, over the "
            f"last {self.observer.engine_load.window_s:g} s (0 when idle)", value=self.observer.engine_load.rtf())


class _QuietHandler(WSGIRequestHandler):
    """No line on stderr per request (scrapes and health checks come every few seconds)."""

    def log_message(self, format, *args) -> None:
        pass


class Metrics:
    """A server's metrics: registry, observer for the hot path, live gauges, ``/metrics`` endpoint."""

    def __init__(self, *, version: str, model: str, precision: str, device: str):
        self.registry = CollectorRegistry()
        self.observer = PrometheusObserver(self.registry)
        self._live = _LiveGauges(self.observer)
        self.registry.register(self._live)
        prometheus_client.ProcessCollector(registry=self.registry)
        gc_pause = Histogram("asr_gc_pause_seconds", "Python garbage collections by generation: each one "
                             "holds the GIL, stopping the engine and the event loop alike",
                             ["generation"], buckets=GC_PAUSE_BUCKETS, registry=self.registry)
        for generation in GC_GENERATIONS:
            gc_pause.labels(generation)
        self._gc_timer = GcPauseTimer(lambda gen, seconds: gc_pause.labels(str(gen)).observe(seconds)).install()
        Gauge("asr_build_info", "Always 1; the labels say what is running",
              ["version", "model", "precision", "device"], registry=self.registry
              ).labels(version, model, precision, device).set(1)
        self._httpd = None
        self._thread: threading.Thread | None = None

    def watch(self, service: RecognitionService) -> None:
        """Read the live gauges (active streams, queue depth) from ``service``."""
        self._live.service = service

    def exposition(self) -> bytes:
        """The current metrics in Prometheus text format."""
        return prometheus_client.generate_latest(self.registry)

    def serve(self, host: str, port: int, serving: Callable[[], bool] = lambda: False) -> int:
        """Start the HTTP endpoint on a daemon thread; return the bound port. ``/healthz``: 200
        ``SERVING`` while ``serving()``, else 503 ``NOT_SERVING`` (what grpc.health.v1 says, for
        a proxy whose checks speak only HTTP/1); any other path: the metrics."""
        metrics = prometheus_client.make_wsgi_app(self.registry)

        def app(environ, start_response):
            if environ.get("PATH_INFO") != "/healthz":
                return metrics(environ, start_response)
            up = serving()
            body = b"SERVING\n" if up else b"NOT_SERVING\n"
            start_response("200 OK" if up else "503 Service Unavailable",
                           [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
            return [body]

        class Server(ThreadingWSGIServer):
            address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

        try:
            self._httpd = make_server(host, port, app, Server, handler_class=_QuietHandler)
        except OSError as exc:
            raise OSError(f"cannot listen for metrics on {host}:{port} (--metrics-port / "
                          f"ASR_METRICS_PORT; -1 turns the endpoint off): {exc.strerror or exc}") from exc
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        return self._httpd.server_port

    def close(self) -> None:
        self._gc_timer.close()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = self._thread = None
