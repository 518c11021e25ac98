"""``google.cloud.speech.v1.Speech`` adapter: Google Cloud Speech v1 messages <-> the service's one path.

The message classes are the raw protobuf classes behind ``google-cloud-speech``'s proto-plus
types (``cloud_speech.X.pb()``), so the wire format is exactly what ``SpeechClient`` speaks. That
package ships no servicer, so the two RPCs are served by a generic handler built from those
classes' serializers; ``LongRunningRecognize`` is not served (UNIMPLEMENTED). What maps and what
is refused is listed in docs/compatibility.md.
"""

from __future__ import annotations

import logging
from contextlib import aclosing
from typing import Callable

import grpc
from google.cloud.speech_v1.types import cloud_speech
from google.protobuf import descriptor_pb2, descriptor_pool

from server.api.asr_v1 import duration
from server.api.compat import AudioIntake, alternatives_decoding, check_language, unsupported, whole_audio
from server.api.status import client_of, maps_errors
from server.api.streaming import check_message_size, stream_results, streaming_config_of
from server.core.service import RecognitionService
from server.core.session import Session
from server.errors import invalid, shown
from server.types import Alternative, Encoding, Result, SpeechContext, StreamConfig

log = logging.getLogger(__name__)
API = "google"
SERVICE = "google.cloud.speech.v1.Speech"

RecognitionConfig = cloud_speech.RecognitionConfig.pb()
RecognizeRequest = cloud_speech.RecognizeRequest.pb()
RecognizeResponse = cloud_speech.RecognizeResponse.pb()
StreamingRecognizeRequest = cloud_speech.StreamingRecognizeRequest.pb()
StreamingRecognizeResponse = cloud_speech.StreamingRecognizeResponse.pb()
StreamingRecognitionResult = cloud_speech.StreamingRecognitionResult.pb()
SpeechRecognitionResult = cloud_speech.SpeechRecognitionResult.pb()
SpeechRecognitionAlternative = cloud_speech.SpeechRecognitionAlternative.pb()
WordInfo = cloud_speech.WordInfo.pb()

ENCODING_FIELD = "config.encoding LINEAR16"
WAV_REQUIRED = ("config.encoding is ENCODING_UNSPECIFIED, which is accepted only for WAV audio "
                "(its header tells the format); set config.encoding to LINEAR16 for raw samples")
# Google's general-purpose models, all served by this server's one model; the specialised
# ones (phone_call, video, medical_*) are refused rather than silently replaced.
GENERAL_MODELS = ("", "default", "latest_long", "latest_short", "command_and_search")


def config_from_google(service: RecognitionService, config: RecognitionConfig,
                       interim_results: bool = False) -> StreamConfig:
    """A ``StreamConfig`` from Google's config; INVALID_ARGUMENT names what cannot be honoured."""
    if config.encoding not in (RecognitionConfig.ENCODING_UNSPECIFIED, RecognitionConfig.LINEAR16):
        raise unsupported(f"config.encoding {RecognitionConfig.AudioEncoding.Name(config.encoding)}",
                          "is not supported; send LINEAR16")
    check_language(config.language_code, "config.language_code")
    if config.model not in (*GENERAL_MODELS, service.description.model_name):
        raise invalid(f"config.model {shown(config.model)} is not available; this server serves "
                      f"{', '.join(repr(m) for m in GENERAL_MODELS[1:])} (or an empty model) "
                      f"with its model {service.description.model_name!r}")
    _refuse_unsupported(config)
    method, beam_width, max_alternatives = alternatives_decoding(
        service, config.max_alternatives, "config.max_alternatives")
    return service.stream_config(
        encoding=Encoding.LINEAR16, sample_rate_hertz=config.sample_rate_hertz,
        channels=config.audio_channel_count, method=method, beam_width=beam_width,
        max_alternatives=max_alternatives, interim_results=interim_results,
        word_time_offsets=config.enable_word_time_offsets, speech_contexts=_speech_contexts(config))


def _speech_contexts(config: RecognitionConfig) -> list[SpeechContext]:
    """``speech_contexts`` and ``adaptation.phrase_sets`` as phrases with their boosts (a phrase's
    own boost, else its set's); class tokens, custom classes, references and grammars are refused."""
    contexts = []
    for i, context in enumerate(config.speech_contexts):
        for j, phrase in enumerate(context.phrases):
            _refuse_class_token(phrase, f"config.speech_contexts[{i}].phrases[{j}]")
        contexts.append(SpeechContext(tuple(context.phrases), context.boost))
    adaptation = config.adaptation
    if adaptation.phrase_set_references:
        raise unsupported("config.adaptation.phrase_set_references",
                          "is not supported: send the phrases inline in adaptation.phrase_sets")
    if adaptation.custom_classes:
        raise unsupported("config.adaptation.custom_classes")
    if adaptation.HasField("abnf_grammar"):
        raise unsupported("config.adaptation.abnf_grammar")
    for i, phrase_set in enumerate(adaptation.phrase_sets):
        for j, phrase in enumerate(phrase_set.phrases):
            _refuse_class_token(phrase.value, f"config.adaptation.phrase_sets[{i}].phrases[{j}].value")
            contexts.append(SpeechContext((phrase.value,), phrase.boost or phrase_set.boost))
    return contexts


def _refuse_class_token(phrase: str, field: str) -> None:
    if "$" in phrase:
        raise unsupported(f"{field} {shown(phrase)}", "has a class token ($...), which this server does not "
                          "support; send the words themselves")


def _refuse_unsupported(config: RecognitionConfig) -> None:
    """Features whose absence a user would not notice from the transcript alone."""
    if config.alternative_language_codes:
        raise unsupported("config.alternative_language_codes")
    if config.profanity_filter:
        raise unsupported("config.profanity_filter")
    if config.HasField("transcript_normalization"):
        raise unsupported("config.transcript_normalization")
    if config.enable_separate_recognition_per_channel:
        raise unsupported("config.enable_separate_recognition_per_channel",
                          "is not supported: channels are mixed to mono")
    if config.enable_spoken_punctuation.value:
        raise unsupported("config.enable_spoken_punctuation")
    if config.enable_spoken_emojis.value:
        raise unsupported("config.enable_spoken_emojis")
    if config.diarization_config.enable_speaker_diarization:
        raise unsupported("config.diarization_config.enable_speaker_diarization")


def wav_rule(config: RecognitionConfig) -> str | None:
    return WAV_REQUIRED if config.encoding == RecognitionConfig.ENCODING_UNSPECIFIED else None


def language(config: RecognitionConfig) -> str:
    return (config.language_code or "en-US").lower()  # Google answers in lower case


def alternative_to_google(alt: Alternative) -> SpeechRecognitionAlternative:
    return SpeechRecognitionAlternative(
        transcript=alt.transcript, confidence=alt.confidence,
        words=[WordInfo(word=w.word, start_time=duration(w.start_s), end_time=duration(w.end_s))
               for w in alt.words])


def streaming_result_to_google(result: Result, language_code: str) -> StreamingRecognitionResult:
    return StreamingRecognitionResult(
        alternatives=[alternative_to_google(a) for a in result.alternatives], is_final=result.is_final,
        stability=0.0 if result.is_final else result.stability, result_end_time=duration(result.end_s),
        language_code=language_code)


class GoogleSpeechServicer:
    def __init__(self, service: RecognitionService):
        self.service = service

    @maps_errors
    async def StreamingRecognize(self, request_iterator, context):
        async with aclosing(stream_results(self.service, API, request_iterator, self._start,
                                           client_of(context, self.service.settings))) as results:
            async for first, result in results:
                single_utterance = result.is_final and first.streaming_config.single_utterance
                if single_utterance:
                    yield StreamingRecognizeResponse(
                        speech_event_type=StreamingRecognizeResponse.END_OF_SINGLE_UTTERANCE,
                        speech_event_time=duration(result.end_s))
                yield StreamingRecognizeResponse(
                    results=[streaming_result_to_google(result, language(first.streaming_config.config))])
                if single_utterance:
                    return  # one utterance only: the rest of the audio is not recognised

    def _start(self, first: StreamingRecognizeRequest, session: Session) -> Callable[[bytes], None]:
        """Configure ``session`` from the stream's first message; returns the feed of later audio."""
        sc = streaming_config_of(first)
        if sc.enable_voice_activity_events or sc.HasField("voice_activity_timeout"):
            raise unsupported("streaming_config.enable_voice_activity_events / voice_activity_timeout")
        session.start(config_from_google(self.service, sc.config, sc.interim_results))
        intake = AudioIntake(session, ENCODING_FIELD, wav_rule(sc.config))
        log.info("google stream %d started (%s)", session.id, session.config)
        return intake.feed

    @maps_errors
    async def Recognize(self, request: RecognizeRequest, context):
        check_message_size(request, self.service)
        config = config_from_google(self.service, request.config).validate(self.service.settings)
        source = request.audio.WhichOneof("audio_source")
        if source == "uri":
            raise unsupported("audio.uri", "(Cloud Storage) is not supported; send audio.content")
        if source is None:
            raise invalid("audio.content must be set")
        audio = whole_audio(request.audio.content, config, ENCODING_FIELD, wav_rule(request.config))
        finals, _ = await self.service.recognize(config, audio, API, client_of(context, self.service.settings))
        return RecognizeResponse(results=[
            SpeechRecognitionResult(alternatives=[alternative_to_google(a) for a in r.alternatives],
                                    result_end_time=duration(r.end_s), language_code=language(request.config))
            for r in finals])


def _handlers(servicer: GoogleSpeechServicer) -> dict[str, grpc.RpcMethodHandler]:
    return {
        "Recognize": grpc.unary_unary_rpc_method_handler(
            servicer.Recognize, request_deserializer=RecognizeRequest.FromString,
            response_serializer=RecognizeResponse.SerializeToString),
        "StreamingRecognize": grpc.stream_stream_rpc_method_handler(
            servicer.StreamingRecognize, request_deserializer=StreamingRecognizeRequest.FromString,
            response_serializer=StreamingRecognizeResponse.SerializeToString),
    }


def register_service_descriptor() -> None:
    """Describe the served RPCs in the default descriptor pool, so that server reflection can
    answer for ``google.cloud.speech.v1.Speech`` (proto-plus registers the messages only).
    The description is built from the package's own message descriptors."""
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(SERVICE)
        return  # a newer package (or an earlier call) already described it
    except KeyError:
        pass
    messages_file = RecognizeRequest.DESCRIPTOR.file
    proto = descriptor_pb2.FileDescriptorProto(
        name="emformer_asr/google_cloud_speech_v1_served.proto", package=messages_file.package,
        syntax="proto3", dependency=[messages_file.name])
    service = proto.service.add(name=SERVICE.rsplit(".", 1)[1])
    for name, request, response, streaming in (
            ("Recognize", RecognizeRequest, RecognizeResponse, False),
            ("StreamingRecognize", StreamingRecognizeRequest, StreamingRecognizeResponse, True)):
        service.method.add(name=name, input_type="." + request.DESCRIPTOR.full_name,
                           output_type="." + response.DESCRIPTOR.full_name,
                           client_streaming=streaming, server_streaming=streaming)
    pool.AddSerializedFile(proto.SerializeToString())


def add_to_server(service: RecognitionService, server: grpc.aio.Server) -> str:
    """Serve the Google Cloud Speech v1 protocol on ``server``; returns the service name."""
    register_service_descriptor()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        SERVICE, _handlers(GoogleSpeechServicer(service))),))
    return SERVICE
