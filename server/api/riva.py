"""``nvidia.riva.asr.RivaSpeechRecognition`` adapter: Riva messages <-> the service's one path.

The message classes and servicer base come from the ``nvidia-riva-client`` package, so the
wire format is exactly what ``riva.client.ASRService`` speaks. What maps and what is refused
is listed in docs/compatibility.md.
"""

from __future__ import annotations

import logging
from contextlib import aclosing
from typing import Callable

import grpc
from riva.client.proto import riva_asr_pb2 as rasr
from riva.client.proto import riva_asr_pb2_grpc as rasr_grpc
from riva.client.proto import riva_audio_pb2 as raudio

from server.api.compat import LANGUAGE, AudioIntake, alternatives_decoding, check_language, unsupported, whole_audio
from server.api.status import client_of, maps_errors
from server.api.streaming import check_message_size, stream_results, streaming_config_of
from server.core.service import RecognitionService
from server.core.session import Session
from server.errors import invalid, shown
from server.types import MAX_REQUEST_ID_CHARS, Alternative, Encoding, Result, StreamConfig

log = logging.getLogger(__name__)
API = "riva"
SERVICE = rasr.DESCRIPTOR.services_by_name["RivaSpeechRecognition"].full_name
ENCODING_FIELD = "config.encoding LINEAR_PCM"
WAV_REQUIRED = ("config.encoding is ENCODING_UNSPECIFIED, which is accepted only for WAV audio "
                "(its header tells the format); set config.encoding to LINEAR_PCM for raw samples")
_REFUSED_ENDPOINTING = ("start_history", "start_threshold", "stop_threshold", "stop_history_eou",
                        "stop_threshold_eou")


def config_from_riva(service: RecognitionService, config: rasr.RecognitionConfig, interim_results: bool,
                     request_id: str) -> StreamConfig:
    """A ``StreamConfig`` from Riva's config; INVALID_ARGUMENT names what cannot be honoured."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:  # echoed in every response: bounded
        raise invalid(f"id.value must be at most {MAX_REQUEST_ID_CHARS} characters")
    if config.encoding not in (raudio.ENCODING_UNSPECIFIED, raudio.LINEAR_PCM):
        raise unsupported(f"config.encoding {raudio.AudioEncoding.Name(config.encoding)}",
                          "is not supported; send LINEAR_PCM")
    check_language(config.language_code, "config.language_code")
    if config.model and config.model != service.description.model_name:
        raise invalid(f"config.model {shown(config.model)} is not available; this server has "
                      f"{service.description.model_name!r} (or leave it empty)")
    _refuse_unsupported(config)
    method, beam_width, max_alternatives = alternatives_decoding(
        service, config.max_alternatives, "config.max_alternatives")
    return service.stream_config(
        encoding=Encoding.LINEAR16, sample_rate_hertz=config.sample_rate_hertz,
        channels=config.audio_channel_count, method=method, beam_width=beam_width,
        max_alternatives=max_alternatives, interim_results=interim_results,
        word_time_offsets=config.enable_word_time_offsets,
        trailing_silence_ms=_trailing_silence_ms(config), request_id=request_id,
        speech_contexts=config.speech_contexts)


def _refuse_unsupported(config: rasr.RecognitionConfig) -> None:
    """Features whose absence a user would not notice from the transcript alone."""
    if config.profanity_filter:
        raise unsupported("config.profanity_filter")
    if config.enable_separate_recognition_per_channel:
        raise unsupported("config.enable_separate_recognition_per_channel",
                          "is not supported: channels are mixed to mono")
    if config.diarization_config.enable_speaker_diarization:
        raise unsupported("config.diarization_config.enable_speaker_diarization")
    if config.custom_configuration:
        raise unsupported(f"config.custom_configuration key {shown(sorted(config.custom_configuration)[0])}")


def _trailing_silence_ms(config: rasr.RecognitionConfig) -> int:
    """Riva's ``stop_history`` (ms of non-speech that end an utterance) is the server's trailing
    silence; its VAD-probability thresholds have no counterpart."""
    ep = config.endpointing_config
    for name in _REFUSED_ENDPOINTING:
        if ep.HasField(name):
            raise unsupported(f"config.endpointing_config.{name}",
                              "is not supported; only stop_history (ms of trailing non-speech) is")
    if ep.HasField("stop_history") and not 80 <= ep.stop_history <= 60_000:
        raise invalid(f"config.endpointing_config.stop_history must be between 80 and 60000 ms, "
                      f"got {ep.stop_history}")
    return ep.stop_history if ep.HasField("stop_history") else 0


def wav_rule(config: rasr.RecognitionConfig) -> str | None:
    return WAV_REQUIRED if config.encoding == raudio.ENCODING_UNSPECIFIED else None


def alternative_to_riva(alt: Alternative, is_final: bool) -> rasr.SpeechRecognitionAlternative:
    # Riva ends final transcripts with a space, so that clients can concatenate them.
    return rasr.SpeechRecognitionAlternative(
        transcript=alt.transcript + " " if is_final and alt.transcript else alt.transcript,
        confidence=alt.confidence, language_code=[LANGUAGE],
        words=[rasr.WordInfo(word=w.word, start_time=round(w.start_s * 1000), end_time=round(w.end_s * 1000),
                             language_code=LANGUAGE) for w in alt.words])


def streaming_result_to_riva(result: Result) -> rasr.StreamingRecognitionResult:
    return rasr.StreamingRecognitionResult(
        alternatives=[alternative_to_riva(a, result.is_final) for a in result.alternatives],
        is_final=result.is_final, stability=result.stability, audio_processed=result.end_s)


class RivaServicer(rasr_grpc.RivaSpeechRecognitionServicer):
    def __init__(self, service: RecognitionService):
        self.service = service

    @maps_errors
    async def StreamingRecognize(self, request_iterator, context):
        async with aclosing(stream_results(self.service, API, request_iterator, self._start,
                                           client_of(context, self.service.settings),
                                           check=check_runtime_config)) as results:
            async for first, result in results:
                yield rasr.StreamingRecognizeResponse(results=[streaming_result_to_riva(result)], id=first.id)

    def _start(self, first: rasr.StreamingRecognizeRequest, session: Session) -> Callable[[bytes], None]:
        """Configure ``session`` from the stream's first message; returns the feed of later audio."""
        sc = streaming_config_of(first)
        check_runtime_config(first)
        session.start(config_from_riva(self.service, sc.config, sc.interim_results, first.id.value))
        intake = AudioIntake(session, ENCODING_FIELD, wav_rule(sc.config))
        log.info("riva stream %d started (%s)", session.id, session.config)
        return intake.feed

    @maps_errors
    async def Recognize(self, request, context):
        check_message_size(request, self.service)
        config = config_from_riva(self.service, request.config, False, request.id.value)
        config = config.validate(self.service.settings)
        audio = whole_audio(request.audio, config, ENCODING_FIELD, wav_rule(request.config))
        finals, _ = await self.service.recognize(config, audio, API, client_of(context, self.service.settings))
        return rasr.RecognizeResponse(
            results=[rasr.SpeechRecognitionResult(alternatives=[alternative_to_riva(a, True) for a in r.alternatives],
                                                  audio_processed=r.end_s) for r in finals],
            id=request.id)

    @maps_errors
    async def GetRivaSpeechRecognitionConfig(self, request, context):
        d = self.service.description
        if request.model_name and request.model_name != d.model_name:
            return rasr.RivaSpeechRecognitionConfigResponse()  # a filter that matches nothing
        s = self.service.settings
        parameters = {
            "language_code": LANGUAGE, "type": "online", "streaming": "true", "offline": "true",
            "sample_rate": str(d.sample_rate_hertz), "chunk_size": f"{d.chunk_ms / 1000:g}",
            "right_context": f"{d.right_context_ms / 1000:g}", "decoder_type": s.decoding_method,
            "beam_width": str(s.beam_width), "max_alternatives": str(s.max_beam_width),
            "precision": d.precision, "device": d.device, "max_batch_size": str(s.max_batch),
            "vocabulary_size": str(d.vocabulary_size), "version": d.version}
        return rasr.RivaSpeechRecognitionConfigResponse(model_config=[
            rasr.RivaSpeechRecognitionConfigResponse.Config(model_name=d.model_name, parameters=parameters)])


def check_runtime_config(request: rasr.StreamingRecognizeRequest) -> None:
    if request.runtime_config:
        raise unsupported(f"runtime_config key {shown(sorted(request.runtime_config)[0])}")


def add_to_server(service: RecognitionService, server: grpc.aio.Server) -> str:
    """Serve the Riva ASR protocol on ``server``; returns the service name (for reflection)."""
    rasr_grpc.add_RivaSpeechRecognitionServicer_to_server(RivaServicer(service), server)
    return SERVICE
