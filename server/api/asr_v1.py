"""``asr.v1.SpeechRecognition`` servicer: protobuf <-> transport-free types, nothing more."""

from __future__ import annotations

import logging
import time
from contextlib import aclosing
from typing import Callable

from google.protobuf.duration_pb2 import Duration

from asr.v1 import asr_pb2, asr_pb2_grpc
from server.api.status import client_of, maps_errors
from server.api.streaming import check_message_size, stream_results, streaming_config_of
from server.core.service import RecognitionService
from server.core.session import Session
from server.errors import invalid
from server.types import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, Alternative, DecodingMethod, Encoding, Result, StreamConfig

log = logging.getLogger(__name__)
API = "asr.v1"

_ENCODINGS = {asr_pb2.LINEAR16: Encoding.LINEAR16, asr_pb2.FLOAT32: Encoding.FLOAT32}
_METHODS = {asr_pb2.GREEDY: DecodingMethod.GREEDY, asr_pb2.BEAM_SEARCH: DecodingMethod.BEAM_SEARCH}


def duration(seconds: float) -> Duration:
    whole = int(seconds)
    return Duration(seconds=whole, nanos=int(round((seconds - whole) * 1e9)))


def config_from_pb(service: RecognitionService, config: asr_pb2.RecognitionConfig, interim_results: bool,
                   request_id: str) -> StreamConfig:
    if config.decoding_method not in (asr_pb2.DECODING_METHOD_UNSPECIFIED, *_METHODS):
        raise invalid(f"config.decoding_method {config.decoding_method} is unknown")
    if config.beam_width < 0 or config.max_alternatives < 0 or config.audio_channel_count < 0:
        raise invalid("config.beam_width, max_alternatives and audio_channel_count must not be negative")
    ep = config.endpointing
    return service.stream_config(
        encoding=_ENCODINGS.get(config.encoding), sample_rate_hertz=config.sample_rate_hertz,
        channels=config.audio_channel_count, method=_METHODS.get(config.decoding_method),
        beam_width=config.beam_width, max_alternatives=config.max_alternatives,
        interim_results=interim_results, word_time_offsets=config.enable_word_time_offsets,
        endpointing_disabled=ep.disabled, trailing_silence_ms=ep.trailing_silence_ms,
        max_utterance_ms=ep.max_utterance_ms, request_id=request_id, speech_contexts=config.speech_contexts)


def alternative_to_pb(alt: Alternative) -> asr_pb2.SpeechRecognitionAlternative:
    return asr_pb2.SpeechRecognitionAlternative(
        transcript=alt.transcript, confidence=alt.confidence,
        words=[asr_pb2.WordInfo(word=w.word, start_time=duration(w.start_s), end_time=duration(w.end_s))
               for w in alt.words])


def streaming_result_to_pb(result: Result) -> asr_pb2.StreamingRecognitionResult:
    latency_ms = (time.monotonic() - result.chunk_ready_at) * 1000
    return asr_pb2.StreamingRecognitionResult(
        alternatives=[alternative_to_pb(a) for a in result.alternatives], is_final=result.is_final,
        stability=result.stability, result_start_time=duration(result.start_s),
        result_end_time=duration(result.end_s), utterance_index=result.utterance_index,
        timing=asr_pb2.ServerTiming(chunk_latency_ms=latency_ms, queue_wait_ms=result.queue_wait_s * 1000,
                                    compute_ms=result.compute_s * 1000, batch_size=result.batch_size))


class AsrServicer(asr_pb2_grpc.SpeechRecognitionServicer):
    def __init__(self, service: RecognitionService):
        self.service = service

    @maps_errors
    async def StreamingRecognize(self, request_iterator, context):
        async with aclosing(stream_results(self.service, API, request_iterator, self._start,
                                           client_of(context, self.service.settings))) as results:
            async for first, result in results:
                yield asr_pb2.StreamingRecognizeResponse(results=[streaming_result_to_pb(result)],
                                                         request_id=first.streaming_config.request_id)

    def _start(self, first: asr_pb2.StreamingRecognizeRequest, session: Session) -> Callable[[bytes], None]:
        """Configure ``session`` from the stream's first message; returns the feed of later audio."""
        sc = streaming_config_of(first)
        session.start(config_from_pb(self.service, sc.config, sc.interim_results, sc.request_id))
        log.info("stream %d started (request_id=%r, %s)", session.id, sc.request_id, session.config)
        return session.feed

    @maps_errors
    async def Recognize(self, request, context):
        check_message_size(request, self.service)
        config = config_from_pb(self.service, request.config, False, request.request_id)
        finals, audio_seconds = await self.service.recognize(config, request.audio_content, API,
                                                             client_of(context, self.service.settings))
        return asr_pb2.RecognizeResponse(
            results=[asr_pb2.SpeechRecognitionResult(
                alternatives=[alternative_to_pb(a) for a in r.alternatives],
                result_start_time=duration(r.start_s), result_end_time=duration(r.end_s),
                utterance_index=r.utterance_index) for r in finals],
            request_id=request.request_id, audio_duration=duration(audio_seconds))

    @maps_errors
    async def GetModelInfo(self, request, context):
        d = self.service.description
        s = self.service.settings
        return asr_pb2.ModelInfo(
            model_name=d.model_name, sample_rate_hertz=d.sample_rate_hertz,
            min_sample_rate_hertz=MIN_SAMPLE_RATE, max_sample_rate_hertz=MAX_SAMPLE_RATE,
            supported_encodings=list(_ENCODINGS), chunk_ms=d.chunk_ms, right_context_ms=d.right_context_ms,
            precision=d.precision, device=d.device, vocabulary_size=d.vocabulary_size,
            num_parameters=d.num_parameters,
            default_decoding_method=asr_pb2.GREEDY if s.decoding_method == "greedy" else asr_pb2.BEAM_SEARCH,
            default_beam_width=s.beam_width,
            limits=asr_pb2.Limits(max_streams=s.max_streams, max_stream_duration_s=s.max_stream_seconds,
                                  max_message_bytes=s.max_message_bytes, max_beam_width=s.max_beam_width,
                                  max_alternatives=s.max_beam_width, max_phrases=s.max_phrases,
                                  max_phrase_chars=s.max_phrase_chars, min_boost=s.min_boost,
                                  max_boost=s.max_boost, default_boost=s.default_boost),
            version=d.version, kernels=d.kernels, batching_exact=d.batching_exact)
