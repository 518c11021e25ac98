import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AudioEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[AudioEncoding]
    LINEAR16: _ClassVar[AudioEncoding]
    FLOAT32: _ClassVar[AudioEncoding]

class DecodingMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECODING_METHOD_UNSPECIFIED: _ClassVar[DecodingMethod]
    GREEDY: _ClassVar[DecodingMethod]
    BEAM_SEARCH: _ClassVar[DecodingMethod]
ENCODING_UNSPECIFIED: AudioEncoding
LINEAR16: AudioEncoding
FLOAT32: AudioEncoding
DECODING_METHOD_UNSPECIFIED: DecodingMethod
GREEDY: DecodingMethod
BEAM_SEARCH: DecodingMethod

class EndpointingConfig(_message.Message):
    __slots__ = ("disabled", "trailing_silence_ms", "max_utterance_ms")
    DISABLED_FIELD_NUMBER: _ClassVar[int]
    TRAILING_SILENCE_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_UTTERANCE_MS_FIELD_NUMBER: _ClassVar[int]
    disabled: bool
    trailing_silence_ms: int
    max_utterance_ms: int
    def __init__(self, disabled: _Optional[bool] = ..., trailing_silence_ms: _Optional[int] = ..., max_utterance_ms: _Optional[int] = ...) -> None: ...

class RecognitionConfig(_message.Message):
    __slots__ = ("encoding", "sample_rate_hertz", "audio_channel_count", "decoding_method", "beam_width", "max_alternatives", "enable_word_time_offsets", "endpointing", "speech_contexts")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HERTZ_FIELD_NUMBER: _ClassVar[int]
    AUDIO_CHANNEL_COUNT_FIELD_NUMBER: _ClassVar[int]
    DECODING_METHOD_FIELD_NUMBER: _ClassVar[int]
    BEAM_WIDTH_FIELD_NUMBER: _ClassVar[int]
    MAX_ALTERNATIVES_FIELD_NUMBER: _ClassVar[int]
    ENABLE_WORD_TIME_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTING_FIELD_NUMBER: _ClassVar[int]
    SPEECH_CONTEXTS_FIELD_NUMBER: _ClassVar[int]
    encoding: AudioEncoding
    sample_rate_hertz: int
    audio_channel_count: int
    decoding_method: DecodingMethod
    beam_width: int
    max_alternatives: int
    enable_word_time_offsets: bool
    endpointing: EndpointingConfig
    speech_contexts: _containers.RepeatedCompositeFieldContainer[SpeechContext]
    def __init__(self, encoding: _Optional[_Union[AudioEncoding, str]] = ..., sample_rate_hertz: _Optional[int] = ..., audio_channel_count: _Optional[int] = ..., decoding_method: _Optional[_Union[DecodingMethod, str]] = ..., beam_width: _Optional[int] = ..., max_alternatives: _Optional[int] = ..., enable_word_time_offsets: _Optional[bool] = ..., endpointing: _Optional[_Union[EndpointingConfig, _Mapping]] = ..., speech_contexts: _Optional[_Iterable[_Union[SpeechContext, _Mapping]]] = ...) -> None: ...

class SpeechContext(_message.Message):
    __slots__ = ("phrases", "boost")
    PHRASES_FIELD_NUMBER: _ClassVar[int]
    BOOST_FIELD_NUMBER: _ClassVar[int]
    phrases: _containers.RepeatedScalarFieldContainer[str]
    boost: float
    def __init__(self, phrases: _Optional[_Iterable[str]] = ..., boost: _Optional[float] = ...) -> None: ...

class StreamingRecognitionConfig(_message.Message):
    __slots__ = ("config", "interim_results", "request_id")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    INTERIM_RESULTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    config: RecognitionConfig
    interim_results: bool
    request_id: str
    def __init__(self, config: _Optional[_Union[RecognitionConfig, _Mapping]] = ..., interim_results: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class StreamingRecognizeRequest(_message.Message):
    __slots__ = ("streaming_config", "audio_content")
    STREAMING_CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_CONTENT_FIELD_NUMBER: _ClassVar[int]
    streaming_config: StreamingRecognitionConfig
    audio_content: bytes
    def __init__(self, streaming_config: _Optional[_Union[StreamingRecognitionConfig, _Mapping]] = ..., audio_content: _Optional[bytes] = ...) -> None: ...

class WordInfo(_message.Message):
    __slots__ = ("start_time", "end_time", "word")
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    WORD_FIELD_NUMBER: _ClassVar[int]
    start_time: _duration_pb2.Duration
    end_time: _duration_pb2.Duration
    word: str
    def __init__(self, start_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., end_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., word: _Optional[str] = ...) -> None: ...

class SpeechRecognitionAlternative(_message.Message):
    __slots__ = ("transcript", "confidence", "words")
    TRANSCRIPT_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    WORDS_FIELD_NUMBER: _ClassVar[int]
    transcript: str
    confidence: float
    words: _containers.RepeatedCompositeFieldContainer[WordInfo]
    def __init__(self, transcript: _Optional[str] = ..., confidence: _Optional[float] = ..., words: _Optional[_Iterable[_Union[WordInfo, _Mapping]]] = ...) -> None: ...

class ServerTiming(_message.Message):
    __slots__ = ("chunk_latency_ms", "queue_wait_ms", "compute_ms", "batch_size")
    CHUNK_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    chunk_latency_ms: float
    queue_wait_ms: float
    compute_ms: float
    batch_size: int
    def __init__(self, chunk_latency_ms: _Optional[float] = ..., queue_wait_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., batch_size: _Optional[int] = ...) -> None: ...

class StreamingRecognitionResult(_message.Message):
    __slots__ = ("alternatives", "is_final", "stability", "result_start_time", "result_end_time", "utterance_index", "timing")
    ALTERNATIVES_FIELD_NUMBER: _ClassVar[int]
    IS_FINAL_FIELD_NUMBER: _ClassVar[int]
    STABILITY_FIELD_NUMBER: _ClassVar[int]
    RESULT_START_TIME_FIELD_NUMBER: _ClassVar[int]
    RESULT_END_TIME_FIELD_NUMBER: _ClassVar[int]
    UTTERANCE_INDEX_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    alternatives: _containers.RepeatedCompositeFieldContainer[SpeechRecognitionAlternative]
    is_final: bool
    stability: float
    result_start_time: _duration_pb2.Duration
    result_end_time: _duration_pb2.Duration
    utterance_index: int
    timing: ServerTiming
    def __init__(self, alternatives: _Optional[_Iterable[_Union[SpeechRecognitionAlternative, _Mapping]]] = ..., is_final: _Optional[bool] = ..., stability: _Optional[float] = ..., result_start_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., result_end_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., utterance_index: _Optional[int] = ..., timing: _Optional[_Union[ServerTiming, _Mapping]] = ...) -> None: ...

class StreamingRecognizeResponse(_message.Message):
    __slots__ = ("results", "request_id")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[StreamingRecognitionResult]
    request_id: str
    def __init__(self, results: _Optional[_Iterable[_Union[StreamingRecognitionResult, _Mapping]]] = ..., request_id: _Optional[str] = ...) -> None: ...

class RecognizeRequest(_message.Message):
    __slots__ = ("config", "audio_content", "request_id")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_CONTENT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    config: RecognitionConfig
    audio_content: bytes
    request_id: str
    def __init__(self, config: _Optional[_Union[RecognitionConfig, _Mapping]] = ..., audio_content: _Optional[bytes] = ..., request_id: _Optional[str] = ...) -> None: ...

class SpeechRecognitionResult(_message.Message):
    __slots__ = ("alternatives", "result_start_time", "result_end_time", "utterance_index")
    ALTERNATIVES_FIELD_NUMBER: _ClassVar[int]
    RESULT_START_TIME_FIELD_NUMBER: _ClassVar[int]
    RESULT_END_TIME_FIELD_NUMBER: _ClassVar[int]
    UTTERANCE_INDEX_FIELD_NUMBER: _ClassVar[int]
    alternatives: _containers.RepeatedCompositeFieldContainer[SpeechRecognitionAlternative]
    result_start_time: _duration_pb2.Duration
    result_end_time: _duration_pb2.Duration
    utterance_index: int
    def __init__(self, alternatives: _Optional[_Iterable[_Union[SpeechRecognitionAlternative, _Mapping]]] = ..., result_start_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., result_end_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., utterance_index: _Optional[int] = ...) -> None: ...

class RecognizeResponse(_message.Message):
    __slots__ = ("results", "request_id", "audio_duration")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIO_DURATION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SpeechRecognitionResult]
    request_id: str
    audio_duration: _duration_pb2.Duration
    def __init__(self, results: _Optional[_Iterable[_Union[SpeechRecognitionResult, _Mapping]]] = ..., request_id: _Optional[str] = ..., audio_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_streams", "max_stream_duration_s", "max_message_bytes", "max_beam_width", "max_alternatives", "max_phrases", "max_phrase_chars", "min_boost", "max_boost", "default_boost")
    MAX_STREAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAM_DURATION_S_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BEAM_WIDTH_FIELD_NUMBER: _ClassVar[int]
    MAX_ALTERNATIVES_FIELD_NUMBER: _ClassVar[int]
    MAX_PHRASES_FIELD_NUMBER: _ClassVar[int]
    MAX_PHRASE_CHARS_FIELD_NUMBER: _ClassVar[int]
    MIN_BOOST_FIELD_NUMBER: _ClassVar[int]
    MAX_BOOST_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_BOOST_FIELD_NUMBER: _ClassVar[int]
    max_streams: int
    max_stream_duration_s: float
    max_message_bytes: int
    max_beam_width: int
    max_alternatives: int
    max_phrases: int
    max_phrase_chars: int
    min_boost: float
    max_boost: float
    default_boost: float
    def __init__(self, max_streams: _Optional[int] = ..., max_stream_duration_s: _Optional[float] = ..., max_message_bytes: _Optional[int] = ..., max_beam_width: _Optional[int] = ..., max_alternatives: _Optional[int] = ..., max_phrases: _Optional[int] = ..., max_phrase_chars: _Optional[int] = ..., min_boost: _Optional[float] = ..., max_boost: _Optional[float] = ..., default_boost: _Optional[float] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_name", "sample_rate_hertz", "min_sample_rate_hertz", "max_sample_rate_hertz", "supported_encodings", "chunk_ms", "right_context_ms", "precision", "device", "vocabulary_size", "num_parameters", "default_decoding_method", "default_beam_width", "limits", "version", "kernels", "batching_exact")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HERTZ_FIELD_NUMBER: _ClassVar[int]
    MIN_SAMPLE_RATE_HERTZ_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLE_RATE_HERTZ_FIELD_NUMBER: _ClassVar[int]
    SUPPORTED_ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_MS_FIELD_NUMBER: _ClassVar[int]
    RIGHT_CONTEXT_MS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    VOCABULARY_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_DECODING_METHOD_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_BEAM_WIDTH_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KERNELS_FIELD_NUMBER: _ClassVar[int]
    BATCHING_EXACT_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    sample_rate_hertz: int
    min_sample_rate_hertz: int
    max_sample_rate_hertz: int
    supported_encodings: _containers.RepeatedScalarFieldContainer[AudioEncoding]
    chunk_ms: float
    right_context_ms: float
    precision: str
    device: str
    vocabulary_size: int
    num_parameters: int
    default_decoding_method: DecodingMethod
    default_beam_width: int
    limits: Limits
    version: str
    kernels: str
    batching_exact: bool
    def __init__(self, model_name: _Optional[str] = ..., sample_rate_hertz: _Optional[int] = ..., min_sample_rate_hertz: _Optional[int] = ..., max_sample_rate_hertz: _Optional[int] = ..., supported_encodings: _Optional[_Iterable[_Union[AudioEncoding, str]]] = ..., chunk_ms: _Optional[float] = ..., right_context_ms: _Optional[float] = ..., precision: _Optional[str] = ..., device: _Optional[str] = ..., vocabulary_size: _Optional[int] = ..., num_parameters: _Optional[int] = ..., default_decoding_method: _Optional[_Union[DecodingMethod, str]] = ..., default_beam_width: _Optional[int] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., version: _Optional[str] = ..., kernels: _Optional[str] = ..., batching_exact: _Optional[bool] = ...) -> None: ...
