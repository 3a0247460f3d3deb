"""Pure functions between the wire's messages and the engine's types: the one module knowing both.

Requests arrive validated (see interceptor.py), so these functions trust the contract's rules.
Unset optional fields are left out of the engine's dataclasses, so the engine's defaults apply.
"""

import dataclasses
import math
from typing import Any

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from mlx_serving.engine import events
from mlx_serving.engine.errors import FieldViolation, InvalidRequest
from mlx_serving.engine.models import (
    GenerationDefaults,
    ModelInfo,
    ModelSource,
    ModelState,
    Quantization,
)
from mlx_serving.engine.prompts import Tokenized, TokenizeOptions
from mlx_serving.engine.requests import (
    TOOL_CHOICE_AUTO,
    TOOL_CHOICE_NONE,
    TOOL_CHOICE_REQUIRED,
    ChatMessage,
    Constraint,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    SamplingParams,
    TokenLogprobs,
    Tool,
    ToolCall,
    Usage,
)
from mlx_serving.v1 import events_service_pb2 as events_pb
from mlx_serving.v1 import generate_service_pb2 as generate_pb
from mlx_serving.v1 import model_service_pb2 as model_pb
from mlx_serving.v1 import tokenize_service_pb2 as tokenize_pb

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
    FinishReason.TIME_LIMIT: generate_pb.FINISH_REASON_TIME_LIMIT,
    FinishReason.STRUCTURE_INCOMPLETE: generate_pb.FINISH_REASON_STRUCTURE_INCOMPLETE,
}

TOOL_CHOICE_MODES = {
    generate_pb.TOOL_CHOICE_MODE_UNSPECIFIED: TOOL_CHOICE_AUTO,
    generate_pb.TOOL_CHOICE_MODE_AUTO: TOOL_CHOICE_AUTO,
    generate_pb.TOOL_CHOICE_MODE_NONE: TOOL_CHOICE_NONE,
    generate_pb.TOOL_CHOICE_MODE_REQUIRED: TOOL_CHOICE_REQUIRED,
}

# GenerationCompleted.finish_reason: a FinishReason's value, ABORTED for a sequence the engine
# ended (the contract's CANCELLED: the server stopped it), or "" where the engine gave none.
EVENT_FINISH_REASONS = {reason.value: FINISH_REASONS[reason] for reason in FinishReason} | {
    events.ABORTED: generate_pb.FINISH_REASON_CANCELLED,
    "": generate_pb.FINISH_REASON_UNSPECIFIED,
}

MODEL_STATES = {
    ModelState.LOADING: model_pb.MODEL_STATE_LOADING,
    ModelState.READY: model_pb.MODEL_STATE_READY,
}

EVENT_TYPES: dict[int, type] = {
    events_pb.EVENT_TYPE_MODEL_LOADED: events.ModelLoaded,
    events_pb.EVENT_TYPE_MODEL_UNLOADED: events.ModelUnloaded,
    events_pb.EVENT_TYPE_MODEL_INVALIDATED: events.ModelInvalidated,
    events_pb.EVENT_TYPE_GENERATION_STARTED: events.GenerationStarted,
    events_pb.EVENT_TYPE_TOKEN_GENERATED: events.TokenGenerated,
    events_pb.EVENT_TYPE_GENERATION_COMPLETED: events.GenerationCompleted,
    events_pb.EVENT_TYPE_ERROR: events.ErrorOccurred,
    events_pb.EVENT_TYPE_RUNTIME_STATUS: events.RuntimeStatus,
}

RUNTIME_STATES = {
    "ready": events_pb.RUNTIME_STATE_READY,
    "busy": events_pb.RUNTIME_STATE_BUSY,
    "error": events_pb.RUNTIME_STATE_ERROR,
    "shutdown": events_pb.RUNTIME_STATE_SHUTDOWN,
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
    options: dict[str, Any] = {}
    for name in ("max_tokens", "prompt_logprobs", "n", "truncate_prompt_tokens", "draft_tokens"):
        if request.HasField(name):
            options[name] = getattr(request, name)
    if request.HasField("time_limit"):
        options["time_limit"] = request.time_limit.ToNanoseconds() / 1e9
    if prompt == "chat":
        options |= chat_options(request.chat)
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
        include_special_tokens=request.include_special_tokens,
        request_id=request_id,
        metadata=tuple(sorted(request.metadata.items())),
        constraint=constraint(request),
        logprobs=request.logprobs or request.top_logprobs > 0,
        top_logprobs=request.top_logprobs,
        client_request_id=request.client_request_id,
        min_tokens=request.min_tokens,
        **options,
    )


def constraint(request: generate_pb.GenerateRequest) -> Constraint | None:
    kind = request.WhichOneof("constraint")
    if kind is None:
        return None
    if kind == "json_object":
        return Constraint(kind)
    if kind == "choice":
        return Constraint(kind, tuple(request.choice.choices))
    return Constraint(kind, getattr(request, kind))


def chat_options(chat: generate_pb.ChatPrompt) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if chat.HasField("add_generation_prompt"):
        options["add_generation_prompt"] = chat.add_generation_prompt
    if chat.tools:
        options["tools"] = tuple(
            Tool(tool.name, tool.description, tool.parameters) for tool in chat.tools
        )
    choice = chat.tool_choice.WhichOneof("choice")
    if choice == "mode":
        options["tool_choice"] = TOOL_CHOICE_MODES[chat.tool_choice.mode]
    elif choice == "tool":
        options["tool_choice"] = chat.tool_choice.tool
    if chat.HasField("template_kwargs"):
        options["template_kwargs"] = struct_dict(chat.template_kwargs)
    return options


# Not json_format.MessageToDict: it raises on a number that JSON cannot write (infinity, NaN),
# which a Struct holds and a template may take.
def struct_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    return {key: struct_value(value) for key, value in struct.fields.items()}


def struct_value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return struct_dict(value.struct_value)
    if kind == "list_value":
        return [struct_value(item) for item in value.list_value.values]
    return None if kind in (None, "null_value") else getattr(value, kind)


def chat_messages(chat: generate_pb.ChatPrompt) -> tuple[ChatMessage, ...]:
    return tuple(
        ChatMessage(
            role=m.role,
            content=m.content,
            tool_calls=tuple(tool_call(call) for call in m.tool_calls),
            tool_call_id=m.tool_call_id,
            name=m.name,
        )
        for m in chat.messages
    )


def tool_call(call: generate_pb.ToolCall) -> ToolCall:
    return ToolCall(call.id, call.name, call.arguments)


def sampling_params(request: generate_pb.GenerateRequest) -> SamplingParams:
    chosen = {name: getattr(request, name) for name in SAMPLING_FIELDS if request.HasField(name)}
    return SamplingParams(**chosen, logit_bias=tuple(sorted(request.logit_bias.items())))


def generate_response(
    chunk: GenerationChunk, request_id: str, client_request_id: str = ""
) -> generate_pb.GenerateResponse:
    return generate_pb.GenerateResponse(
        request_id=request_id,
        text=chunk.text,
        token_ids=chunk.token_ids,
        finish_reason=FINISH_REASONS[chunk.finish_reason] if chunk.finish_reason else None,
        usage=usage(chunk.usage) if chunk.usage else None,
        matched_stop=chunk.matched_stop,
        logprobs=[logprobs_pb(entry) for entry in chunk.logprobs],
        prompt_logprobs=[logprobs_pb(entry) for entry in chunk.prompt_logprobs],
        index=chunk.index,
        seed=chunk.seed,
        client_request_id=client_request_id,
        tool_calls=[tool_call_pb(call) for call in chunk.tool_calls],
        total_usage=usage(chunk.total_usage) if chunk.total_usage else None,
    )


def logprobs_pb(entry: TokenLogprobs) -> generate_pb.Logprobs:
    return generate_pb.Logprobs(
        token=token_logprob_pb(entry.token), top=[token_logprob_pb(t) for t in entry.top]
    )


def token_logprob_pb(token: tuple[int, str, float]) -> generate_pb.TokenLogprob:
    token_id, text, logprob = token
    return generate_pb.TokenLogprob(token_id=token_id, text=text, logprob=logprob)


def tool_call_pb(call: ToolCall) -> generate_pb.ToolCall:
    return generate_pb.ToolCall(id=call.id, name=call.name, arguments=call.arguments)


def usage(used: Usage) -> generate_pb.Usage:
    return generate_pb.Usage(
        prompt_tokens=used.prompt_tokens,
        completion_tokens=used.completion_tokens,
        cached_prompt_tokens=used.cached_prompt_tokens,
        queue_time=duration(used.queue_time),
        time_to_first_token=duration(used.time_to_first_token),
        tokens_per_second=used.tokens_per_second,
        total_time=duration(used.total_time),
        draft_tokens_proposed=used.draft_tokens_proposed,
        draft_tokens_accepted=used.draft_tokens_accepted,
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
        weight_bytes=info.weight_bytes,
        weight_bytes_loaded=info.weight_bytes_loaded,
        eos_token_ids=info.eos_token_ids,
        bos_token_id=info.bos_token_id,
        generation_defaults=generation_defaults_pb(info.generation_defaults),
        draft_model_id=info.draft_model_id,
        draft_tokens=info.draft_tokens,
    )


def generation_defaults_pb(defaults: GenerationDefaults) -> model_pb.GenerationDefaults | None:
    """The parameters the model's generation_config.json gives; None (unset) when it gives none."""
    given = {
        name: value for name, value in dataclasses.asdict(defaults).items() if value is not None
    }
    return model_pb.GenerationDefaults(**given) if given else None


# ---- tokens ----------------------------------------------------------------------------


def tokenize_texts(request: tokenize_pb.TokenizeRequest) -> tuple[list[str], str]:
    """The texts a TokenizeRequest asks about and the field that holds them. `texts` needs
    `text` empty: the answer goes in `results` or in the top-level fields, never both."""
    if not request.texts:
        return [request.text], "text"
    if request.text:
        raise InvalidRequest(FieldViolation("texts", "set together with `text`; send one"))
    return list(request.texts), "texts"


def tokenize_options(request: tokenize_pb.TokenizeRequest) -> TokenizeOptions:
    return TokenizeOptions(
        add_special_tokens=request.add_special_tokens,
        return_pieces=request.return_pieces,
        return_offsets=request.return_offsets,
        count_only=request.count_only,
    )


def tokenize_response(results: list[Tokenized], several: bool) -> tokenize_pb.TokenizeResponse:
    """One text's tokens in the top-level fields; several texts' in `results`, with their
    total count."""
    if several:
        return tokenize_pb.TokenizeResponse(
            results=[tokenized_pb(result) for result in results],
            count=sum(result.count for result in results),
        )
    (result,) = results
    return tokenize_pb.TokenizeResponse(
        token_ids=result.token_ids,
        pieces=result.pieces,
        offsets=token_offsets_pb(result),
        count=result.count,
    )


def tokenized_pb(result: Tokenized) -> tokenize_pb.Tokenized:
    return tokenize_pb.Tokenized(
        token_ids=result.token_ids,
        pieces=result.pieces,
        offsets=token_offsets_pb(result),
        count=result.count,
    )


def token_offsets_pb(result: Tokenized) -> list[tokenize_pb.TokenOffset]:
    return [tokenize_pb.TokenOffset(start=start, end=end) for start, end in result.offsets]


# ---- events ----------------------------------------------------------------------------


def event_filter(
    request: events_pb.SubscribeRequest,
) -> tuple[frozenset[type] | None, frozenset[str] | None]:
    """(payload types, model ids) for Engine.subscribe; None where the request leaves it open."""
    kinds = frozenset(EVENT_TYPES[t] for t in request.types) or None
    return kinds, frozenset(request.model_ids) or None


def event_pb(event: events.Event) -> events_pb.Event:
    field, payload = event_payload_pb(event.payload)
    return events_pb.Event(
        time=timestamp(event.time),
        request_id=event.request_id,
        client_request_id=event.client_request_id,
        **{field: payload},
    )


def event_payload_pb(payload: events.Payload) -> tuple[str, Any]:
    """(the Event oneof field, its message) for one engine event payload."""
    metadata = dict(payload.metadata)
    match payload:
        case events.ModelLoaded():
            fields = dataclasses.asdict(payload) | {"metadata": metadata}
            return "model_loaded", events_pb.ModelLoaded(**fields)
        case events.ModelUnloaded():
            fields = dataclasses.asdict(payload) | {"metadata": metadata}
            return "model_unloaded", events_pb.ModelUnloaded(**fields)
        case events.ModelInvalidated():
            fields = dataclasses.asdict(payload) | {"metadata": metadata}
            return "model_invalidated", events_pb.ModelInvalidated(**fields)
        case events.GenerationStarted():
            return "generation_started", generation_started_pb(payload)
        case events.TokenGenerated():
            fields = dataclasses.asdict(payload) | {"metadata": metadata}
            return "token_generated", events_pb.TokenGenerated(**fields)
        case events.GenerationCompleted():
            return "generation_completed", events_pb.GenerationCompleted(
                model=payload.model,
                tokens_generated=payload.tokens_generated,
                duration=duration(payload.duration_seconds),
                throughput=payload.throughput,
                finish_reason=EVENT_FINISH_REASONS[payload.finish_reason],
                metadata=metadata,
                draft_tokens_proposed=payload.draft_tokens_proposed,
                draft_tokens_accepted=payload.draft_tokens_accepted,
                draft_acceptance_rate=payload.draft_tokens_accepted / payload.draft_tokens_proposed
                if payload.draft_tokens_proposed
                else None,
            )
        case events.ErrorOccurred():
            fields = dataclasses.asdict(payload) | {"metadata": metadata}
            return "error", events_pb.Error(**fields)
        case events.RuntimeStatus():
            return "runtime_status", events_pb.RuntimeStatus(
                status=RUNTIME_STATES[payload.status],
                models_loaded=payload.models_loaded,
                active_tasks=payload.active_tasks,
                metadata=metadata,
            )
    raise TypeError(f"no message for {type(payload).__name__}")


def generation_started_pb(payload: events.GenerationStarted) -> events_pb.GenerationStarted:
    prompt: dict[str, Any] = {}
    if payload.text is not None:
        prompt["text"] = payload.text
    elif payload.messages is not None:
        messages = [
            generate_pb.ChatMessage(role=m.role, content=m.content) for m in payload.messages
        ]
        prompt["chat"] = generate_pb.ChatPrompt(
            messages=messages, add_generation_prompt=payload.add_generation_prompt
        )
    else:
        prompt["tokens"] = generate_pb.TokenIds(ids=payload.token_ids)
    return events_pb.GenerationStarted(
        model=payload.model,
        max_tokens=payload.max_tokens,
        metadata=dict(payload.metadata),
        **prompt,
    )
