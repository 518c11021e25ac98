"""Assembles the gRPC server: servicers, health, reflection, limits; start and stop."""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from asr.v1 import asr_pb2, asr_pb2_grpc
from server import __version__
from server.api import google_speech, riva
from server.api.asr_v1 import AsrServicer
from server.config import ServerSettings
from server.metrics import Metrics
from server.models import LoadedModel, load_model
from server.service import RecognitionService

log = logging.getLogger(__name__)

ASR_SERVICE = asr_pb2.DESCRIPTOR.services_by_name["SpeechRecognition"].full_name


class AsrServer:
    """A running recognition server (used by ``asr-server`` and by the tests)."""

    def __init__(self, settings: ServerSettings, model: LoadedModel | None = None):
        self.settings = settings
        self.model = model
        self.service: RecognitionService | None = None
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self.port = 0
        self.metrics: Metrics | None = None  # None when --metrics-port is -1
        self.metrics_port = 0  # the bound /metrics port once started (0: no endpoint)

    async def start(self) -> int:
        """Load and warm up the model, bind the port, start serving; return the bound port."""
        s = self.settings
        loop = asyncio.get_running_loop()
        if self.model is None:
            self.model = await loop.run_in_executor(None, load_model, s.model, s.seed)
        if s.metrics_port >= 0:
            self.metrics = Metrics(version=__version__, model=self.model.name, precision=s.precision,
                                   device=s.device)
        self.service = RecognitionService(s, self.model, self.metrics.observer if self.metrics else None)
        if self.metrics:
            self.metrics.watch(self.service)
            self.metrics_port = self.metrics.serve(s.metrics_host, s.metrics_port)
        await self.service.start()  # warms the model up: health says SERVING only after this
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
        ])
        asr_pb2_grpc.add_SpeechRecognitionServicer_to_server(AsrServicer(self.service), self.server)
        compat_services = [add(self.service, self.server)  # Riva and Google Cloud Speech v1
                           for add in (riva.add_to_server, google_speech.add_to_server)]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [ASR_SERVICE, *compat_services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], self.server)
        address = f"{s.host}:{s.port}" if ":" not in s.host else f"[{s.host}]:{s.port}"
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        await self.server.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s (%s, %.1f M parameters, %s) on %s:%d", self.model.name, s.precision,
                 self.model.num_parameters / 1e6, s.device, s.host, self.port)
        return self.port

    async def _set_health(self, status) -> None:
        for name in ("", ASR_SERVICE):
            result = self.health.set(name, status)
            if asyncio.iscoroutine(result):
                await result

    async def stop(self, grace: float | None = 1.0) -> None:
        if self.server is not None:
            await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            await self.server.stop(grace)
            self.server = None
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
