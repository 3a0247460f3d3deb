import datetime

from buf.validate import validate_pb2 as _validate_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from mlx_serving.v1 import generate_service_pb2 as _generate_service_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_TYPE_UNSPECIFIED: _ClassVar[EventType]
    EVENT_TYPE_MODEL_LOADED: _ClassVar[EventType]
    EVENT_TYPE_MODEL_UNLOADED: _ClassVar[EventType]
    EVENT_TYPE_GENERATION_STARTED: _ClassVar[EventType]
    EVENT_TYPE_GENERATION_COMPLETED: _ClassVar[EventType]
    EVENT_TYPE_ERROR: _ClassVar[EventType]
    EVENT_TYPE_MODEL_INVALIDATED: _ClassVar[EventType]
    EVENT_TYPE_TOKEN_GENERATED: _ClassVar[EventType]
    EVENT_TYPE_RUNTIME_STATUS: _ClassVar[EventType]

class RuntimeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUNTIME_STATE_UNSPECIFIED: _ClassVar[RuntimeState]
    RUNTIME_STATE_READY: _ClassVar[RuntimeState]
    RUNTIME_STATE_BUSY: _ClassVar[RuntimeState]
    RUNTIME_STATE_ERROR: _ClassVar[RuntimeState]
    RUNTIME_STATE_SHUTDOWN: _ClassVar[RuntimeState]
EVENT_TYPE_UNSPECIFIED: EventType
EVENT_TYPE_MODEL_LOADED: EventType
EVENT_TYPE_MODEL_UNLOADED: EventType
EVENT_TYPE_GENERATION_STARTED: EventType
EVENT_TYPE_GENERATION_COMPLETED: EventType
EVENT_TYPE_ERROR: EventType
EVENT_TYPE_MODEL_INVALIDATED: EventType
EVENT_TYPE_TOKEN_GENERATED: EventType
EVENT_TYPE_RUNTIME_STATUS: EventType
RUNTIME_STATE_UNSPECIFIED: RuntimeState
RUNTIME_STATE_READY: RuntimeState
RUNTIME_STATE_BUSY: RuntimeState
RUNTIME_STATE_ERROR: RuntimeState
RUNTIME_STATE_SHUTDOWN: RuntimeState

class SubscribeRequest(_message.Message):
    __slots__ = ("types", "model_ids")
    TYPES_FIELD_NUMBER: _ClassVar[int]
    MODEL_IDS_FIELD_NUMBER: _ClassVar[int]
    types: _containers.RepeatedScalarFieldContainer[EventType]
    model_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, types: _Optional[_Iterable[_Union[EventType, str]]] = ..., model_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class SubscribeResponse(_message.Message):
    __slots__ = ("event", "dropped_events")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    DROPPED_EVENTS_FIELD_NUMBER: _ClassVar[int]
    event: Event
    dropped_events: int
    def __init__(self, event: _Optional[_Union[Event, _Mapping]] = ..., dropped_events: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("time", "request_id", "client_request_id", "model_loaded", "model_unloaded", "model_invalidated", "generation_started", "token_generated", "generation_completed", "error", "runtime_status")
    TIME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_LOADED_FIELD_NUMBER: _ClassVar[int]
    MODEL_UNLOADED_FIELD_NUMBER: _ClassVar[int]
    MODEL_INVALIDATED_FIELD_NUMBER: _ClassVar[int]
    GENERATION_STARTED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_GENERATED_FIELD_NUMBER: _ClassVar[int]
    GENERATION_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_STATUS_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    request_id: str
    client_request_id: str
    model_loaded: ModelLoaded
    model_unloaded: ModelUnloaded
    model_invalidated: ModelInvalidated
    generation_started: GenerationStarted
    token_generated: TokenGenerated
    generation_completed: GenerationCompleted
    error: Error
    runtime_status: RuntimeStatus
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., request_id: _Optional[str] = ..., client_request_id: _Optional[str] = ..., model_loaded: _Optional[_Union[ModelLoaded, _Mapping]] = ..., model_unloaded: _Optional[_Union[ModelUnloaded, _Mapping]] = ..., model_invalidated: _Optional[_Union[ModelInvalidated, _Mapping]] = ..., generation_started: _Optional[_Union[GenerationStarted, _Mapping]] = ..., token_generated: _Optional[_Union[TokenGenerated, _Mapping]] = ..., generation_completed: _Optional[_Union[GenerationCompleted, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., runtime_status: _Optional[_Union[RuntimeStatus, _Mapping]] = ...) -> None: ...

class ModelLoaded(_message.Message):
    __slots__ = ("model", "model_path", "quantization", "parameters", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_path: str
    quantization: str
    parameters: int
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, model: _Optional[str] = ..., model_path: _Optional[str] = ..., quantization: _Optional[str] = ..., parameters: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ModelUnloaded(_message.Message):
    __slots__ = ("model", "reason", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    model: str
    reason: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, model: _Optional[str] = ..., reason: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ModelInvalidated(_message.Message):
    __slots__ = ("model", "reason", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    model: str
    reason: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, model: _Optional[str] = ..., reason: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GenerationStarted(_message.Message):
    __slots__ = ("model", "text", "chat", "tokens", "max_tokens", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    model: str
    text: str
    chat: _generate_service_pb2.ChatPrompt
    tokens: _generate_service_pb2.TokenIds
    max_tokens: int
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, model: _Optional[str] = ..., text: _Optional[str] = ..., chat: _Optional[_Union[_generate_service_pb2.ChatPrompt, _Mapping]] = ..., tokens: _Optional[_Union[_generate_service_pb2.TokenIds, _Mapping]] = ..., max_tokens: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class TokenGenerated(_message.Message):
    __slots__ = ("model", "token", "token_id", "logprob", "end_of_sequence", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    END_OF_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    model: str
    token: str
    token_id: int
    logprob: float
    end_of_sequence: bool
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, model: _Optional[str] = ..., token: _Optional[str] = ..., token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., end_of_sequence: _Optional[bool] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GenerationCompleted(_message.Message):
    __slots__ = ("model", "tokens_generated", "duration", "throughput", "finish_reason", "metadata", "draft_tokens_proposed", "draft_tokens_accepted", "draft_acceptance_rate")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_PROPOSED_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DRAFT_ACCEPTANCE_RATE_FIELD_NUMBER: _ClassVar[int]
    model: str
    tokens_generated: int
    duration: _duration_pb2.Duration
    throughput: float
    finish_reason: _generate_service_pb2.FinishReason
    metadata: _containers.ScalarMap[str, str]
    draft_tokens_proposed: int
    draft_tokens_accepted: int
    draft_acceptance_rate: float
    def __init__(self, model: _Optional[str] = ..., tokens_generated: _Optional[int] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., throughput: _Optional[float] = ..., finish_reason: _Optional[_Union[_generate_service_pb2.FinishReason, str]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., draft_tokens_proposed: _Optional[int] = ..., draft_tokens_accepted: _Optional[int] = ..., draft_acceptance_rate: _Optional[float] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("error", "code", "model", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    error: str
    code: str
    model: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, error: _Optional[str] = ..., code: _Optional[str] = ..., model: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RuntimeStatus(_message.Message):
    __slots__ = ("status", "models_loaded", "active_tasks", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MODELS_LOADED_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_TASKS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    status: RuntimeState
    models_loaded: int
    active_tasks: int
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, status: _Optional[_Union[RuntimeState, str]] = ..., models_loaded: _Optional[int] = ..., active_tasks: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...
