"""What a caller asks the engine to generate, and what comes back."""

import enum
from dataclasses import dataclass, field

DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 1.0


@dataclass(frozen=True)
class ToolCall:
    """A call of a tool: by the model (parsed from its output) or in a conversation's history."""

    id: str
    name: str
    # JSON text.
    arguments: str


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    # The JSON schema of the arguments, as JSON text; empty for none.
    parameters: str = ""


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    # A tool result's call id and tool name.
    tool_call_id: str = ""
    name: str = ""


# ToolChoice modes; any other value of GenerationRequest.tool_choice names a tool.
TOOL_CHOICE_AUTO = "auto"
TOOL_CHOICE_NONE = "none"
TOOL_CHOICE_REQUIRED = "required"


@dataclass(frozen=True)
class Constraint:
    """What the output must be. `kind` names the GenerateRequest field it came from."""

    kind: str  # "json_schema", "json_object", "regex", "grammar" or "choice"
    value: str | tuple[str, ...] = ""


DEFAULT_PENALTY_CONTEXT = 64


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # How many recent tokens the penalties look at.
    penalty_context: int = DEFAULT_PENALTY_CONTEXT
    # (token id, bias) pairs added to the logits before sampling.
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass(frozen=True)
class GenerationRequest:
    """Exactly one of text, messages, token_ids is set (the wire layer guarantees it)."""

    model_id: str
    text: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    add_generation_prompt: bool = True
    token_ids: tuple[int, ...] | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # Text that ends the generation when it appears in the output.
    stop: tuple[str, ...] = ()
    # Token ids that end the generation (besides the model's EOS unless ignore_eos).
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Keep the matched stop string (or stop token's text) at the end of the output.
    include_stop: bool = False
    # Show special tokens (EOS, chat markers) in the text; their ids are sent either way.
    include_special_tokens: bool = False
    request_id: str = ""
    # Caller's labels, echoed in this request's events.
    metadata: tuple[tuple[str, str], ...] = ()
    # Chat only: tools for the template, whether/which one must be called, template kwargs.
    tools: tuple[Tool, ...] = ()
    tool_choice: str = TOOL_CHOICE_AUTO
    template_kwargs: dict = field(default_factory=dict)
    constraint: Constraint | None = None
    # Return each token's logprob, with this many alternatives (logprobs is implied by > 0).
    logprobs: bool = False
    top_logprobs: int = 0
    # Return the prompt's logprobs with this many alternatives; None: not at all.
    prompt_logprobs: int | None = None
    client_request_id: str = ""
    # Samples of the same prompt.
    n: int = 1
    # EOS and stop token ids cannot end the output before this many tokens.
    min_tokens: int = 0
    # Keep this many last prompt tokens of a longer prompt instead of refusing it.
    truncate_prompt_tokens: int | None = None
    # Seconds after which the generation ends (FinishReason.TIME_LIMIT).
    time_limit: float | None = None
    # Draft tokens proposed per step by the model's draft model (speculative decoding); 0:
    # none; None: the model's default (its pairing's draft_tokens).
    draft_tokens: int | None = None


class FinishReason(enum.Enum):
    MAX_TOKENS = "max_tokens"
    END_OF_SEQUENCE = "end_of_sequence"
    STOP_SEQUENCE = "stop_sequence"
    CANCELLED = "cancelled"
    CONTEXT_LENGTH = "context_length"
    TIME_LIMIT = "time_limit"
    STRUCTURE_INCOMPLETE = "structure_incomplete"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    # Prompt tokens whose KV cache came from the prefix cache instead of being computed.
    cached_prompt_tokens: int
    # Admission to the start of prefill: time spent waiting for a batch slot.
    queue_time: float
    time_to_first_token: float
    tokens_per_second: float
    total_time: float
    # Speculative decoding: draft tokens proposed for this sequence, and how many the model
    # accepted.
    draft_tokens_proposed: int = 0
    draft_tokens_accepted: int = 0


@dataclass(frozen=True)
class GenerationChunk:
    """New text and tokens since the previous chunk; the last one also says why and how much."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    # The stop string or stop token text that ended the generation.
    matched_stop: str = ""
    # With logprobs: one per token of token_ids.
    logprobs: tuple["TokenLogprobs", ...] = ()
    # With prompt_logprobs: one per prompt token after the first (first chunk of sample 0).
    prompt_logprobs: tuple["TokenLogprobs", ...] = ()
    # Which sample of the request (0 to n-1).
    index: int = 0
    # The seed this sample's random state started from (its first chunk only).
    seed: int | None = None
    # Parsed from the output of a request with tools (its last chunk only).
    tool_calls: tuple[ToolCall, ...] = ()
    # With n > 1: every sample's usage together (the stream's very last chunk).
    total_usage: Usage | None = None


@dataclass(frozen=True)
class TokenLogprobs:
    """A token's logprob and its most likely alternatives, each (id, text, logprob)."""

    token: tuple[int, str, float]
    top: tuple[tuple[int, str, float], ...] = ()
