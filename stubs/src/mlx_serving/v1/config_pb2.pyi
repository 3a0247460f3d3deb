from buf.validate import validate_pb2 as _validate_pb2
from mlx_serving.v1 import model_service_pb2 as _model_service_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Config(_message.Message):
    __slots__ = ("server", "engine", "telemetry", "models", "security")
    SERVER_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SECURITY_FIELD_NUMBER: _ClassVar[int]
    server: ServerSettings
    engine: EngineSettings
    telemetry: TelemetrySettings
    models: _containers.RepeatedCompositeFieldContainer[ModelSpec]
    security: SecuritySettings
    def __init__(self, server: _Optional[_Union[ServerSettings, _Mapping]] = ..., engine: _Optional[_Union[EngineSettings, _Mapping]] = ..., telemetry: _Optional[_Union[TelemetrySettings, _Mapping]] = ..., models: _Optional[_Iterable[_Union[ModelSpec, _Mapping]]] = ..., security: _Optional[_Union[SecuritySettings, _Mapping]] = ...) -> None: ...

class ServerSettings(_message.Message):
    __slots__ = ("host", "port", "shutdown_grace_seconds", "log_level", "max_response_bytes", "tls", "max_request_bytes", "max_streams_per_client", "max_subscriptions_per_client", "drain_delay_seconds")
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    SHUTDOWN_GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOG_LEVEL_FIELD_NUMBER: _ClassVar[int]
    MAX_RESPONSE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TLS_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAMS_PER_CLIENT_FIELD_NUMBER: _ClassVar[int]
    MAX_SUBSCRIPTIONS_PER_CLIENT_FIELD_NUMBER: _ClassVar[int]
    DRAIN_DELAY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    host: str
    port: int
    shutdown_grace_seconds: float
    log_level: str
    max_response_bytes: int
    tls: TlsSettings
    max_request_bytes: int
    max_streams_per_client: int
    max_subscriptions_per_client: int
    drain_delay_seconds: float
    def __init__(self, host: _Optional[str] = ..., port: _Optional[int] = ..., shutdown_grace_seconds: _Optional[float] = ..., log_level: _Optional[str] = ..., max_response_bytes: _Optional[int] = ..., tls: _Optional[_Union[TlsSettings, _Mapping]] = ..., max_request_bytes: _Optional[int] = ..., max_streams_per_client: _Optional[int] = ..., max_subscriptions_per_client: _Optional[int] = ..., drain_delay_seconds: _Optional[float] = ...) -> None: ...

class TlsSettings(_message.Message):
    __slots__ = ("cert_file", "key_file", "client_ca_file")
    CERT_FILE_FIELD_NUMBER: _ClassVar[int]
    KEY_FILE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CA_FILE_FIELD_NUMBER: _ClassVar[int]
    cert_file: str
    key_file: str
    client_ca_file: str
    def __init__(self, cert_file: _Optional[str] = ..., key_file: _Optional[str] = ..., client_ca_file: _Optional[str] = ...) -> None: ...

class SecuritySettings(_message.Message):
    __slots__ = ("tokens_file", "tokens_env", "protect_health", "allow_loading", "model_roots", "allow_hugging_face", "hugging_face_organizations", "trust_remote_code", "max_loaded_models", "max_loaded_bytes")
    TOKENS_FILE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_ENV_FIELD_NUMBER: _ClassVar[int]
    PROTECT_HEALTH_FIELD_NUMBER: _ClassVar[int]
    ALLOW_LOADING_FIELD_NUMBER: _ClassVar[int]
    MODEL_ROOTS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_HUGGING_FACE_FIELD_NUMBER: _ClassVar[int]
    HUGGING_FACE_ORGANIZATIONS_FIELD_NUMBER: _ClassVar[int]
    TRUST_REMOTE_CODE_FIELD_NUMBER: _ClassVar[int]
    MAX_LOADED_MODELS_FIELD_NUMBER: _ClassVar[int]
    MAX_LOADED_BYTES_FIELD_NUMBER: _ClassVar[int]
    tokens_file: str
    tokens_env: str
    protect_health: bool
    allow_loading: bool
    model_roots: _containers.RepeatedScalarFieldContainer[str]
    allow_hugging_face: bool
    hugging_face_organizations: _containers.RepeatedScalarFieldContainer[str]
    trust_remote_code: bool
    max_loaded_models: int
    max_loaded_bytes: int
    def __init__(self, tokens_file: _Optional[str] = ..., tokens_env: _Optional[str] = ..., protect_health: _Optional[bool] = ..., allow_loading: _Optional[bool] = ..., model_roots: _Optional[_Iterable[str]] = ..., allow_hugging_face: _Optional[bool] = ..., hugging_face_organizations: _Optional[_Iterable[str]] = ..., trust_remote_code: _Optional[bool] = ..., max_loaded_models: _Optional[int] = ..., max_loaded_bytes: _Optional[int] = ...) -> None: ...

class EngineSettings(_message.Message):
    __slots__ = ("max_batch_size", "max_queued_requests", "prefill_batch_size", "prefill_step_size", "coalesce_seconds", "prefix_cache_bytes", "prefix_cache_entries", "retry_after_seconds", "wedge_timeout_seconds", "prefill_gather_seconds", "fuse_projections", "decode_attention_kernel", "cudnn_prefill_attention", "default_context_length", "tokenizer_threads", "chat_template_workers", "chat_template_timeout_seconds", "max_concurrent_tokenize", "max_tokenize_bytes", "max_constraint_bytes", "max_prompt_tokens", "max_generation_tokens", "max_request_tokens", "max_stop_strings", "max_engine_restarts", "engine_restart_backoff_seconds", "fused_sampler", "native_kernels", "jemalloc", "max_kv_bytes", "kv_memory_fraction", "capacity_context_tokens", "prefill_buckets", "prefill_pacing")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_STEP_SIZE_FIELD_NUMBER: _ClassVar[int]
    COALESCE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WEDGE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_GATHER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FUSE_PROJECTIONS_FIELD_NUMBER: _ClassVar[int]
    DECODE_ATTENTION_KERNEL_FIELD_NUMBER: _ClassVar[int]
    CUDNN_PREFILL_ATTENTION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_THREADS_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_TOKENIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONSTRAINT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_GENERATION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_STOP_STRINGS_FIELD_NUMBER: _ClassVar[int]
    MAX_ENGINE_RESTARTS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_RESTART_BACKOFF_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FUSED_SAMPLER_FIELD_NUMBER: _ClassVar[int]
    NATIVE_KERNELS_FIELD_NUMBER: _ClassVar[int]
    JEMALLOC_FIELD_NUMBER: _ClassVar[int]
    MAX_KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_MEMORY_FRACTION_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_PACING_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_queued_requests: int
    prefill_batch_size: int
    prefill_step_size: int
    coalesce_seconds: float
    prefix_cache_bytes: int
    prefix_cache_entries: int
    retry_after_seconds: float
    wedge_timeout_seconds: float
    prefill_gather_seconds: float
    fuse_projections: bool
    decode_attention_kernel: bool
    cudnn_prefill_attention: bool
    default_context_length: int
    tokenizer_threads: int
    chat_template_workers: int
    chat_template_timeout_seconds: float
    max_concurrent_tokenize: int
    max_tokenize_bytes: int
    max_constraint_bytes: int
    max_prompt_tokens: int
    max_generation_tokens: int
    max_request_tokens: int
    max_stop_strings: int
    max_engine_restarts: int
    engine_restart_backoff_seconds: float
    fused_sampler: bool
    native_kernels: bool
    jemalloc: bool
    max_kv_bytes: int
    kv_memory_fraction: float
    capacity_context_tokens: int
    prefill_buckets: str
    prefill_pacing: float
    def __init__(self, max_batch_size: _Optional[int] = ..., max_queued_requests: _Optional[int] = ..., prefill_batch_size: _Optional[int] = ..., prefill_step_size: _Optional[int] = ..., coalesce_seconds: _Optional[float] = ..., prefix_cache_bytes: _Optional[int] = ..., prefix_cache_entries: _Optional[int] = ..., retry_after_seconds: _Optional[float] = ..., wedge_timeout_seconds: _Optional[float] = ..., prefill_gather_seconds: _Optional[float] = ..., fuse_projections: _Optional[bool] = ..., decode_attention_kernel: _Optional[bool] = ..., cudnn_prefill_attention: _Optional[bool] = ..., default_context_length: _Optional[int] = ..., tokenizer_threads: _Optional[int] = ..., chat_template_workers: _Optional[int] = ..., chat_template_timeout_seconds: _Optional[float] = ..., max_concurrent_tokenize: _Optional[int] = ..., max_tokenize_bytes: _Optional[int] = ..., max_constraint_bytes: _Optional[int] = ..., max_prompt_tokens: _Optional[int] = ..., max_generation_tokens: _Optional[int] = ..., max_request_tokens: _Optional[int] = ..., max_stop_strings: _Optional[int] = ..., max_engine_restarts: _Optional[int] = ..., engine_restart_backoff_seconds: _Optional[float] = ..., fused_sampler: _Optional[bool] = ..., native_kernels: _Optional[bool] = ..., jemalloc: _Optional[bool] = ..., max_kv_bytes: _Optional[int] = ..., kv_memory_fraction: _Optional[float] = ..., capacity_context_tokens: _Optional[int] = ..., prefill_buckets: _Optional[str] = ..., prefill_pacing: _Optional[float] = ...) -> None: ...

class TelemetrySettings(_message.Message):
    __slots__ = ("enabled", "service_name", "prometheus_port", "export_interval_ms", "otlp_endpoint", "prometheus_host")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    SERVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    PROMETHEUS_PORT_FIELD_NUMBER: _ClassVar[int]
    EXPORT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    OTLP_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    PROMETHEUS_HOST_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    service_name: str
    prometheus_port: int
    export_interval_ms: int
    otlp_endpoint: str
    prometheus_host: str
    def __init__(self, enabled: _Optional[bool] = ..., service_name: _Optional[str] = ..., prometheus_port: _Optional[int] = ..., export_interval_ms: _Optional[int] = ..., otlp_endpoint: _Optional[str] = ..., prometheus_host: _Optional[str] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("model_id", "source", "draft_model_id", "draft_tokens")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DRAFT_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    source: _model_service_pb2.ModelSource
    draft_model_id: str
    draft_tokens: int
    def __init__(self, model_id: _Optional[str] = ..., source: _Optional[_Union[_model_service_pb2.ModelSource, _Mapping]] = ..., draft_model_id: _Optional[str] = ..., draft_tokens: _Optional[int] = ...) -> None: ...
