"""Pure functions between the wire's messages and the engine's types: the one module knowing both.

Requests arrive validated (see interceptor.py), so these functions trust the contract's rules.
Unset optional fields are left out of the engine's dataclasses, so the engine's defaults apply.
"""

import dataclasses
import math

from google.protobuf import duration_pb2, timestamp_pb2

from mlx_serving.engine import events
from mlx_serving.engine.models import ModelInfo, ModelSource, ModelState, Quantization
from mlx_serving.engine.requests import (
    ChatMessage,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    SamplingParams,
    Usage,
)
from mlx_serving.v1 import events_service_pb2 as events_pb
from mlx_serving.v1 import generate_service_pb2 as generate_pb
from mlx_serving.v1 import model_service_pb2 as model_pb

# GenerateRequest's optional sampling fields, named as SamplingParams names them.
SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "penalty_context",
)

FINISH_REASONS = {
    FinishReason.MAX_TOKENS: generate_pb.FINISH_REASON_MAX_TOKENS,
    FinishReason.END_OF_SEQUENCE: generate_pb.FINISH_REASON_END_OF_SEQUENCE,
    FinishReason.STOP_SEQUENCE: generate_pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.CANCELLED: generate_pb.FINISH_REASON_CANCELLED,
    FinishReason.CONTEXT_LENGTH: generate_pb.FINISH_REASON_CONTEXT_LENGTH,
}

MODEL_STATES = {
    ModelState.LOADING: model_pb.MODEL_STATE_LOADING,
    ModelState.READY: model_pb.MODEL_STATE_READY,
}

EVENT_TYPES: dict[int, type] = {
    events_pb.EVENT_TYPE_MODEL_LOADED: events.ModelLoaded,
    events_pb.EVENT_TYPE_MODEL_UNLOADED: events.ModelUnloaded,
    events_pb.EVENT_TYPE_GENERATION_STARTED: events.GenerationStarted,
    events_pb.EVENT_TYPE_GENERATION_COMPLETED: events.GenerationCompleted,
    events_pb.EVENT_TYPE_ERROR: events.ErrorOccurred,
}

# Payload type → (Event's oneof field, its message type).
PAYLOADS: dict[type, tuple[str, type]] = {
    events.ModelLoaded: ("model_loaded", events_pb.ModelLoaded),
    events.ModelUnloaded: ("model_unloaded", events_pb.ModelUnloaded),
    events.GenerationStarted: ("generation_started", events_pb.GenerationStarted),
    events.GenerationCompleted: ("generation_completed", events_pb.GenerationCompleted),
    events.ErrorOccurred: ("error", events_pb.Error),
}


# ---- time ------------------------------------------------------------------------------


def nanoseconds(seconds: float) -> int:
    """Seconds and fraction apart: `seconds * 1e9` would lose a Unix time's last digits."""
    whole = math.floor(seconds)
    return whole * 1_000_000_000 + round((seconds - whole) * 1e9)


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(nanoseconds(seconds))
    return stamp


def duration(seconds: float) -> duration_pb2.Duration:
    span = duration_pb2.Duration()
    span.FromNanoseconds(nanoseconds(seconds))
    return span


# ---- generation ------------------------------------------------------------------------


def generation_request(request: generate_pb.GenerateRequest, request_id: str) -> GenerationRequest:
    prompt = request.WhichOneof("prompt")
    options = {"max_tokens": request.max_tokens} if request.HasField("max_tokens") else {}
    if prompt == "chat" and request.chat.HasField("add_generation_prompt"):
        options["add_generation_prompt"] = request.chat.add_generation_prompt
    return GenerationRequest(
        model_id=request.model_id,
        text=request.text if prompt == "text" else None,
        messages=chat_messages(request.chat) if prompt == "chat" else None,
        token_ids=tuple(request.tokens.ids) if prompt == "tokens" else None,
        sampling=sampling_params(request),
        stop=tuple(request.stop),
        stop_token_ids=tuple(request.stop_token_ids),
        ignore_eos=request.ignore_eos,
        include_stop=request.include_stop,
        request_id=request_id,
        **options,
    )


def chat_messages(chat: generate_pb.ChatPrompt) -> tuple[ChatMessage, ...]:
    return tuple(ChatMessage(role=m.role, content=m.content) for m in chat.messages)


def sampling_params(request: generate_pb.GenerateRequest) -> SamplingParams:
    chosen = {name: getattr(request, name) for name in SAMPLING_FIELDS if request.HasField(name)}
    return SamplingParams(**chosen, logit_bias=tuple(sorted(request.logit_bias.items())))


def generate_response(chunk: GenerationChunk, request_id: str) -> generate_pb.GenerateResponse:
    return generate_pb.GenerateResponse(
        request_id=request_id,
        text=chunk.text,
        token_ids=chunk.token_ids,
        finish_reason=FINISH_REASONS[chunk.finish_reason] if chunk.finish_reason else None,
        usage=usage(chunk.usage) if chunk.usage else None,
        matched_stop=chunk.matched_stop,
    )


def usage(used: Usage) -> generate_pb.Usage:
    return generate_pb.Usage(
        prompt_tokens=used.prompt_tokens,
        completion_tokens=used.completion_tokens,
        cached_prompt_tokens=used.cached_prompt_tokens,
        time_to_first_token=duration(used.time_to_first_token),
        tokens_per_second=used.tokens_per_second,
        total_time=duration(used.total_time),
    )


# ---- models ----------------------------------------------------------------------------


def model_source(source: model_pb.ModelSource) -> ModelSource:
    if source.WhichOneof("kind") == "hugging_face":
        repo = source.hugging_face
        return ModelSource(repo_id=repo.repo_id, revision=repo.revision or None)
    return ModelSource(local_path=source.local_path)


def model_source_pb(source: ModelSource) -> model_pb.ModelSource:
    if source.repo_id:
        repo = model_pb.HuggingFaceRepo(repo_id=source.repo_id, revision=source.revision or "")
        return model_pb.ModelSource(hugging_face=repo)
    return model_pb.ModelSource(local_path=source.local_path or "")


def quantization_pb(quantization: Quantization | None) -> model_pb.Quantization | None:
    if quantization is None:
        return None
    return model_pb.Quantization(
        bits=quantization.bits, group_size=quantization.group_size, mode=quantization.mode
    )


def model_pb_from_info(info: ModelInfo) -> model_pb.Model:
    return model_pb.Model(
        model_id=info.model_id,
        source=model_source_pb(info.source),
        state=MODEL_STATES[info.state],
        context_length=info.context_length,
        parameter_count=info.parameter_count,
        dtype=info.dtype,
        quantization=quantization_pb(info.quantization),
        vocab_size=info.vocab_size,
        has_chat_template=info.has_chat_template,
        architecture=info.architecture,
        loaded_time=timestamp(info.loaded_time) if info.loaded_time is not None else None,
    )


# ---- events ----------------------------------------------------------------------------


def event_filter(
    request: events_pb.SubscribeRequest,
) -> tuple[frozenset[type] | None, frozenset[str] | None]:
    """(payload types, model ids) for Engine.subscribe; None where the request leaves it open."""
    kinds = frozenset(EVENT_TYPES[t] for t in request.types) or None
    return kinds, frozenset(request.model_ids) or None


def event_pb(event: events.Event) -> events_pb.Event:
    # The payload dataclasses name their fields as the contract's messages do.
    field, message_type = PAYLOADS[type(event.payload)]
    payload = message_type(**dataclasses.asdict(event.payload))
    return events_pb.Event(
        time=timestamp(event.time),
        request_id=event.request_id,
        model_id=event.model_id,
        **{field: payload},
    )
