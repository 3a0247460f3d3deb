"""A request made ready for the batch: prompt token ids, and every value checked against the model.

The facade runs this before anything reaches the engine process, so a long prompt's
tokenizing, a chat template's rendering and every rejection happen off the decode loop; the
engine process receives an `Admission` whose values cannot fail a batch step.
"""

import itertools
import json
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from .config import EngineConfig
from .errors import FieldViolation, InvalidRequest
from .models import ModelInfo
from .requests import TOOL_CHOICE_NONE, ChatMessage, GenerationRequest, SamplingParams, Tool
from .tools import template_tool

# Violations reported per rejection; the rest are counted, so an error stays small.
MAX_VIOLATIONS = 10
# A text prompt longer than this many times (context × the longest token's bytes) cannot fit
# in the context, so it is refused before tokenizing. The margin covers normalizers that
# shrink text (NFKC folds a 3-byte full-width letter into one byte).
TEXT_BYTES_MARGIN = 4


@dataclass(frozen=True)
class Admission:
    """What the engine process runs: the request (its sampling made safe for the model) and its
    prompt's token ids, with max_tokens clipped to the room left in the context."""

    request: GenerationRequest
    prompt: tuple[int, ...]
    max_tokens: int
    context_clipped: bool


def prompt_field(request: GenerationRequest) -> str:
    """The request field to blame when the prompt does not fit."""
    if request.token_ids is not None:
        return "tokens.ids"
    return "chat.messages" if request.messages is not None else "text"


# apply_chat_template's own arguments and the variables it gives every template: a template
# kwarg of one of these names would clash with ours.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "sanitize_control_tokens",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)


def chat_messages(request: GenerationRequest) -> list[dict[str, Any]]:
    """The messages in the Hugging Face format chat templates read."""
    return [
        chat_message(message, f"chat.messages[{i}]")
        for i, message in enumerate(request.messages or ())
    ]


def chat_message(message: ChatMessage, field: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        entry["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {
                    "name": call.name,
                    # Templates read the arguments as a mapping (`arguments | tojson`,
                    # `.items()`); empty text is a call without arguments.
                    "arguments": json_object(
                        call.arguments or "{}", f"{field}.tool_calls[{j}].arguments"
                    ),
                },
            }
            for j, call in enumerate(message.tool_calls)
        ]
    if message.tool_call_id:
        entry["tool_call_id"] = message.tool_call_id
    if message.name:
        entry["name"] = message.name
    return entry


def chat_tools(request: GenerationRequest) -> list[dict[str, Any]] | None:
    """The tools for the template; None (the template's "no tools") under tool_choice none."""
    tools = [
        template_tool(tool, tool_parameters(tool, f"chat.tools[{i}].parameters"))
        for i, tool in enumerate(request.tools)
    ]
    return tools if tools and request.tool_choice != TOOL_CHOICE_NONE else None


def tool_parameters(tool: Tool, field: str) -> dict | None:
    return json_object(tool.parameters, field) if tool.parameters else None


def json_object(text: str, field: str) -> dict:
    try:
        value = json.loads(text)
    except RecursionError:
        raise InvalidRequest(FieldViolation(field, "JSON nested too deeply")) from None
    except ValueError as exc:
        raise InvalidRequest(FieldViolation(field, f"not valid JSON: {exc}")) from None
    if not isinstance(value, dict):
        raise InvalidRequest(FieldViolation(field, "not a JSON object"))
    return value


def chat_template_kwargs(request: GenerationRequest) -> dict[str, Any]:
    for name in request.template_kwargs:
        if name in RESERVED_TEMPLATE_KWARGS:
            description = f"{name!r} is set by the server, not a template argument"
            raise InvalidRequest(FieldViolation("chat.template_kwargs", description))
    return request.template_kwargs


def chat_text(request: GenerationRequest) -> str:
    """Every text of the chat that the template renders, for check_text_size."""
    parts: list[str] = []
    for message in request.messages or ():
        parts.append(message.content)
        parts.extend(call.arguments for call in message.tool_calls)
    if request.tool_choice != TOOL_CHOICE_NONE:
        for tool in request.tools:
            parts += (tool.description, tool.parameters)
    return "".join(parts)


def check_text_size(text: str, field: str, context_length: int, max_token_bytes: int) -> None:
    """Refuse, before tokenizing, a text that cannot fit in the context whatever its tokens."""
    limit = context_length * max_token_bytes * TEXT_BYTES_MARGIN
    if len(text) * 4 <= limit:  # fits whatever its characters (UTF-8: at most 4 bytes each)
        return
    # At least one byte per character: no need to encode a text this long to know.
    size = len(text) if len(text) > limit else len(text.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise InvalidRequest(
            FieldViolation(
                field,
                f"the prompt has over {limit} bytes, more than a context of {context_length} "
                f"tokens can hold",
            )
        )


def check_limits(request: GenerationRequest, config: EngineConfig) -> None:
    """The server's own limits that need no prompt: checked before any work."""
    violations = []
    if request.max_tokens > config.max_generation_tokens:
        limit = config.max_generation_tokens
        violations.append(FieldViolation("max_tokens", f"over this server's {limit}"))
    if len(request.stop) > config.max_stop_strings:
        limit = config.max_stop_strings
        violations.append(FieldViolation("stop", f"more than this server's {limit} strings"))
    raise_violations(violations)


def admit(
    info: ModelInfo,
    request: GenerationRequest,
    prompt: list[int],
    context_length: int,
    config: EngineConfig | None = None,
) -> Admission:
    """Check `prompt` and the request's token ids against the model (and, given `config`,
    the server's limits); `context_length` is the model's own or, when it states none, the
    configured ceiling."""
    check_request_tokens(request, prompt, info.vocab_size)
    if request.truncate_prompt_tokens is not None:
        prompt = prompt[-request.truncate_prompt_tokens :]
    if config is not None and 0 < config.max_prompt_tokens < len(prompt):
        description = f"the prompt has {len(prompt)} tokens, over this server's limit of "
        description += str(config.max_prompt_tokens)
        raise InvalidRequest(FieldViolation(prompt_field(request), description))
    room = context_length - len(prompt)
    if room <= 0:
        raise InvalidRequest(
            FieldViolation(
                prompt_field(request),
                f"the prompt has {len(prompt)} tokens; the model's context is {context_length}",
            )
        )
    max_tokens = min(request.max_tokens, room)
    cost = len(prompt) + request.n * max_tokens
    if config is not None and 0 < config.max_request_tokens < cost:
        description = f"the prompt and n x max_tokens make {cost} tokens, over this server's "
        description += f"limit of {config.max_request_tokens}"
        raise InvalidRequest(FieldViolation("max_tokens", description))
    request = replace(request, sampling=normalize_sampling(request.sampling, info.vocab_size))
    if request.sampling.seed is None:  # drawn here, so the caller can be told it
        request = replace(request, sampling=replace(request.sampling, seed=secrets.randbits(63)))
    return Admission(request, tuple(prompt), max_tokens, room < request.max_tokens)


def normalize_sampling(params: SamplingParams, vocab_size: int) -> SamplingParams:
    """A top_k at or past the vocabulary keeps every token: it means no top-k (mlx-lm's
    `apply_top_k` would raise inside the batch step)."""
    if params.top_k >= vocab_size > 0:
        return replace(params, top_k=0)
    return params


def check_request_tokens(request: GenerationRequest, prompt: list[int], vocab_size: int) -> None:
    """Every token id the caller gave must exist in the model's vocabulary."""
    if request.token_ids is None and prompt and max(prompt) >= vocab_size:
        # The tokenizer knows more tokens than the model has rows for.
        field, description = prompt_field(request), f"has tokens past the model's {vocab_size}"
        raise InvalidRequest(FieldViolation(field, description))
    prompt_ids = prompt if request.token_ids is not None else ()
    bias_ids = [t for t, _ in request.sampling.logit_bias]
    raise_violations(
        itertools.chain(
            token_id_violations(prompt_ids, vocab_size, "tokens.ids[{}]"),
            token_id_violations(request.stop_token_ids, vocab_size, "stop_token_ids[{}]"),
            token_id_violations(bias_ids, vocab_size, "logit_bias[{id}]"),
        )
    )


def check_token_ids(ids: list[int], vocab_size: int, field_name: str) -> None:
    raise_violations(token_id_violations(ids, vocab_size, field_name + "[{}]"))


def token_id_violations(ids, vocab_size: int, field: str) -> Iterator[FieldViolation]:
    """`field` is formatted with the index (positional) and the id (`id`)."""
    for i, t in enumerate(ids):
        if t >= vocab_size:
            description = f"token id {t} is not below the vocabulary size {vocab_size}"
            yield FieldViolation(field.format(i, id=t), description)


def raise_violations(violations: Iterable[FieldViolation]) -> None:
    """InvalidRequest with the first MAX_VIOLATIONS, counting the rest (a million bad ids must
    not become a million objects, nor an error too big for a trailer)."""
    violations = iter(violations)
    if shown := list(itertools.islice(violations, MAX_VIOLATIONS)):
        raise InvalidRequest(*shown, more=sum(1 for _ in violations))
