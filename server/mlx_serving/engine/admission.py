"""A request made ready for the batch: prompt token ids, and every value checked against the model.

The facade runs this before anything reaches the engine process, so a long prompt's
tokenizing, a chat template's rendering and every rejection happen off the decode loop; the
engine process receives an `Admission` whose values cannot fail a batch step.
"""

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

from .errors import FieldViolation, InvalidRequest
from .models import ModelInfo
from .requests import GenerationRequest, SamplingParams

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


def chat_messages(request: GenerationRequest) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in request.messages or ()]


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


def admit(
    info: ModelInfo, request: GenerationRequest, prompt: list[int], context_length: int
) -> Admission:
    """Check `prompt` and the request's token ids against the model; `context_length` is the
    model's own or, when it states none, the configured ceiling."""
    check_request_tokens(request, prompt, info.vocab_size)
    room = context_length - len(prompt)
    if room <= 0:
        raise InvalidRequest(
            FieldViolation(
                prompt_field(request),
                f"the prompt has {len(prompt)} tokens; the model's context is {context_length}",
            )
        )
    max_tokens = min(request.max_tokens, room)
    request = replace(request, sampling=normalize_sampling(request.sampling, info.vocab_size))
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
