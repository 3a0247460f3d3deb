import datetime

from buf.validate import validate_pb2 as _validate_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
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
EVENT_TYPE_UNSPECIFIED: EventType
EVENT_TYPE_MODEL_LOADED: EventType
EVENT_TYPE_MODEL_UNLOADED: EventType
EVENT_TYPE_GENERATION_STARTED: EventType
EVENT_TYPE_GENERATION_COMPLETED: EventType
EVENT_TYPE_ERROR: EventType

class SubscribeRequest(_message.Message):
    __slots__ = ("types", "model_ids")
    TYPES_FIELD_NUMBER: _ClassVar[int]
    MODEL_IDS_FIELD_NUMBER: _ClassVar[int]
    types: _containers.RepeatedScalarFieldContainer[EventType]
    model_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, types: _Optional[_Iterable[_Union[EventType, str]]] = ..., model_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class SubscribeResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: Event
    def __init__(self, event: _Optional[_Union[Event, _Mapping]] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("time", "request_id", "model_id", "model_loaded", "model_unloaded", "generation_started", "generation_completed", "error")
    TIME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_LOADED_FIELD_NUMBER: _ClassVar[int]
    MODEL_UNLOADED_FIELD_NUMBER: _ClassVar[int]
    GENERATION_STARTED_FIELD_NUMBER: _ClassVar[int]
    GENERATION_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    request_id: str
    model_id: str
    model_loaded: ModelLoaded
    model_unloaded: ModelUnloaded
    generation_started: GenerationStarted
    generation_completed: GenerationCompleted
    error: Error
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., request_id: _Optional[str] = ..., model_id: _Optional[str] = ..., model_loaded: _Optional[_Union[ModelLoaded, _Mapping]] = ..., model_unloaded: _Optional[_Union[ModelUnloaded, _Mapping]] = ..., generation_started: _Optional[_Union[GenerationStarted, _Mapping]] = ..., generation_completed: _Optional[_Union[GenerationCompleted, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class ModelLoaded(_message.Message):
    __slots__ = ("model_path", "load_seconds")
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model_path: str
    load_seconds: float
    def __init__(self, model_path: _Optional[str] = ..., load_seconds: _Optional[float] = ...) -> None: ...

class ModelUnloaded(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class GenerationStarted(_message.Message):
    __slots__ = ("prompt_tokens", "max_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    max_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ...) -> None: ...

class GenerationCompleted(_message.Message):
    __slots__ = ("tokens_generated", "duration_seconds", "tokens_per_second", "finish_reason")
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    tokens_generated: int
    duration_seconds: float
    tokens_per_second: float
    finish_reason: str
    def __init__(self, tokens_generated: _Optional[int] = ..., duration_seconds: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., finish_reason: _Optional[str] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("message", "code")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    message: str
    code: str
    def __init__(self, message: _Optional[str] = ..., code: _Optional[str] = ...) -> None: ...
