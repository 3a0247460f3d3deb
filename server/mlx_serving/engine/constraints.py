"""Structured output: each constrained sequence's token mask, filled for the whole batch at once.

llguidance compiles a JSON schema, regular expression, Lark grammar or choice into a matcher
that, after each token, says which tokens may come next. A constrained sequence gets one hook
in mlx-lm's batch step: its sampler (`ConstrainedRow`), which masks the logits with the allowed
tokens before sampling as the request asks. The first constrained sampler of a step fills the
masks of all the batch's constrained rows together, on llguidance's threads, while the device
runs the step's forward pass (launched before the host reads the previous step's tokens).
No logits processor is needed, so a batch of constrained rows without penalties still skips
mlx-lm's per-row processor loop.

Compiling is cached by constraint and runs on its own thread, so a new schema never stalls the
step of the others (see `Constraints.compile`).
"""

import json
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import llguidance
import llguidance.hf
import mlx.core as mx
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask_par

from .errors import FieldViolation, InvalidRequest

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions
from .requests import TOOL_CHOICE_REQUIRED, Constraint, Tool

# Compiled matchers kept per scheduler (each sequence gets a copy).
COMPILED_CACHE_ENTRIES = 64
# A token the logits processors ruled out (min_tokens' EOS ban) but the constraint allows
# stays possible, just unlikely: a constraint that only allows it must not leave no token.
BANNED_FLOOR = -1e9
# Grammars larger than this many llguidance grammar items are refused.
MAX_GRAMMAR_SIZE = 500_000
# JSON as json.dumps writes it: ", " and ": " and no other whitespace, so a model cannot spend
# its tokens on blanks. A schema's own "x-guidance" options override these.
JSON_DEFAULTS: "JsonCompileOptions" = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


def grammar_text(constraint: Constraint) -> str:
    """The llguidance grammar of a constraint; ValueError says what is wrong with it."""
    kind, value = constraint.kind, constraint.value
    if isinstance(value, tuple):
        if kind != "choice":
            raise ValueError(f"{kind} takes one text")
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(choice) for choice in value)
        )
    if kind == "json_schema":
        try:
            json.loads(value)
        except ValueError as exc:
            raise ValueError(f"not valid JSON: {exc}") from None
        return llguidance.LLMatcher.grammar_from_json_schema(value, defaults=JSON_DEFAULTS)
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema(
            '{"type": "object"}', defaults=JSON_DEFAULTS
        )
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(value)
    if kind == "grammar":
        return llguidance.LLMatcher.grammar_from_lark(value)
    raise ValueError(f"unknown constraint {kind!r}")


def parser_limits() -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(max_grammar_size=MAX_GRAMMAR_SIZE)


def check_constraint(constraint: Constraint, max_bytes: int, field: str = "") -> None:
    """Refuse, naming the field (by default the constraint's own), a constraint that is too
    large or does not compile."""
    field = field or constraint.kind
    size = sum(len(v.encode("utf-8", "surrogatepass")) for v in values(constraint))
    if size > max_bytes:
        raise InvalidRequest(FieldViolation(field, f"longer than this server's {max_bytes} bytes"))
    try:
        grammar = grammar_text(constraint)
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, None, limits=parser_limits()
        )
    except Exception as exc:  # llguidance raises ValueError, or TypeError on odd input
        failed, messages = True, [str(exc) or type(exc).__name__]
    if failed:
        raise InvalidRequest(FieldViolation(field, first_line(messages[0])))


def tool_call_constraint(tokenizer, tools: tuple[Tool, ...], choice: str) -> Constraint:
    """The output as the model family writes tool calls, each a call of one of `tools` (of the
    one named `choice`, unless it is "required") with arguments valid for its schema.

    Only families whose calls are JSON between markers (mlx-lm's json_tools parser: Qwen,
    Hermes and the like) can be constrained; any other is refused, never left unconstrained.
    """
    parser = getattr(tokenizer, "tool_parser", None)
    if not getattr(tokenizer, "has_tool_calling", False) or parser is None:
        raise InvalidRequest(
            FieldViolation("chat.tool_choice", "the model's chat template has no tool calls")
        )
    if not getattr(parser, "__module__", "").endswith(".json_tools"):
        raise InvalidRequest(
            FieldViolation(
                "chat.tool_choice",
                f"tool calls in this model's format ({parser.__module__.rsplit('.', 1)[-1]}) "
                "cannot be forced; use auto",
            )
        )
    chosen = tools if choice == TOOL_CHOICE_REQUIRED else [t for t in tools if t.name == choice]
    if not chosen:
        field = "chat.tools" if choice == TOOL_CHOICE_REQUIRED else "chat.tool_choice.tool"
        raise InvalidRequest(FieldViolation(field, f"no tool to call (choice {choice!r})"))
    calls = {"anyOf": [call_schema(tool) for tool in chosen], "x-guidance": JSON_DEFAULTS}
    start, end = tokenizer.tool_call_start, tokenizer.tool_call_end
    repeat = ' ("\\n" call)*' if choice == TOOL_CHOICE_REQUIRED else ""
    lark = (
        f"start: call{repeat}\n"
        f"call: {json.dumps(start + chr(10))} %json {json.dumps(calls)} {json.dumps(chr(10) + end)}"
    )
    return Constraint("grammar", lark)


def call_schema(tool: Tool) -> dict:
    """{"name": the tool's, "arguments": valid for its schema (any object without one)}."""
    try:
        arguments = json.loads(tool.parameters) if tool.parameters else {"type": "object"}
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        raise InvalidRequest(
            FieldViolation("chat.tools", f"tool {tool.name!r}: parameters are not a JSON schema")
        )
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": arguments},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def values(constraint: Constraint) -> tuple[str, ...]:
    value = constraint.value
    return value if isinstance(value, tuple) else (value,)


def first_line(message: str) -> str:
    """llguidance's message on one line (a regex error's reason is on its third)."""
    return " ".join(message.split())[:500] or "invalid"


def make_tokenizer(tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of an mlx-lm TokenizerWrapper: ~1 s for a large vocabulary, so made
    once per model. A tokenizer it cannot read (not a fast one) raises."""
    eos = sorted(tokenizer.eos_token_ids)
    return llguidance.hf.from_tokenizer(
        getattr(tokenizer, "_tokenizer", tokenizer), eos_token=eos[0] if eos else None
    )


class Constraints:
    """Compiled matchers and the mask executor of one scheduler (the engine process)."""

    def __init__(self):
        self._tokenizers: dict[str, llguidance.LLTokenizer] = {}
        # (model id, constraint) -> (matcher in its start state, its vocabulary size)
        self._compiled: OrderedDict[tuple, tuple] = OrderedDict()
        self._compiler = ThreadPoolExecutor(1, thread_name_prefix="mlx-engine-grammar")
        self.executor = llguidance.LLExecutor()

    def compile(self, model_id: str, tokenizer, constraint: Constraint) -> Future:
        """A future (matcher, vocabulary size) for a new sequence: done at once when the
        constraint was compiled before, else compiled on the grammar thread."""
        key = (model_id, constraint)
        if (compiled := self._compiled.get(key)) is not None:
            self._compiled.move_to_end(key)
            done: Future = Future()
            done.set_result(copied(compiled))
            return done
        return self._compiler.submit(self._compile, key, tokenizer, constraint)

    def _compile(self, key: tuple, tokenizer, constraint: Constraint):
        model_id = key[0]
        try:
            ll_tokenizer = self._tokenizers.get(model_id) or make_tokenizer(tokenizer)
        except Exception as exc:
            raise InvalidRequest(
                FieldViolation(
                    constraint.kind,
                    f"the model's tokenizer cannot be used for constrained output: {exc}",
                )
            ) from None
        self._tokenizers[model_id] = ll_tokenizer
        try:
            grammar = grammar_text(constraint)
        except ValueError as exc:
            raise InvalidRequest(FieldViolation(constraint.kind, first_line(str(exc)))) from None
        matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0, limits=parser_limits())
        if matcher.is_error():
            raise InvalidRequest(FieldViolation(constraint.kind, first_line(matcher.get_error())))
        self._compiled[key] = compiled = (matcher, ll_tokenizer.vocab_size)
        while len(self._compiled) > COMPILED_CACHE_ENTRIES:
            self._compiled.popitem(last=False)
        return copied(compiled)

    def forget_model(self, model_id: str) -> None:
        self._tokenizers.pop(model_id, None)
        for key in [key for key in self._compiled if key[0] == model_id]:
            del self._compiled[key]

    def close(self) -> None:
        self._compiler.shutdown(wait=False, cancel_futures=True)


def copied(compiled: tuple) -> tuple:
    matcher, vocab = compiled
    return matcher.deep_copy(), vocab


class MaskBatch:
    """The constrained rows of a model's batch, whose masks each step fills together."""

    def __init__(self, executor: llguidance.LLExecutor):
        self.executor = executor
        # Rows in the generation batch (from their first sampling until they end).
        self.active: dict[ConstrainedRow, None] = {}
        self.step = 0

    def next_step(self) -> None:
        """Called before each batch step: every row's mask is now stale."""
        self.step += 1

    def fill(self, logprobs: mx.array, caller: "ConstrainedRow") -> None:
        """The mask of every row still without one this step, over `logprobs`' logits.

        The step's forward pass is launched first, so the device never waits for the host:
        then one wait reads every row's last token (each row's own sampler output of the
        previous step, already computed or queued before the forward pass, so reading adds no
        work and does not wait for the new step), and the matchers advance and fill their
        masks in parallel (llguidance's threads) while the device computes.
        """
        self.active[caller] = None
        rows = [row for row in self.active if row.filled != self.step]
        mx.async_eval(logprobs)
        mx.eval([row.last for row in rows if row.last is not None])
        for row in rows:
            row.filled = self.step
            if row.last is not None:
                row.consume(row.last.item())  # type: ignore[arg-type]
                row.last = None
        live = [row for row in rows if row.error is None]
        if not live:
            return
        bitmask = allocate_token_bitmask(len(live), live[0].matcher_vocab)
        fill_next_token_bitmask_par(
            self.executor, [(row.matcher, i) for i, row in enumerate(live)], bitmask
        )
        allowed = unpack_bits(mx.array(bitmask), logprobs.shape[-1])
        for i, row in enumerate(live):
            row.mask = allowed[i : i + 1]
            if row.matcher.is_error():  # such as a grammar past the parser's limits
                row.fail()

    def discard(self, row: "ConstrainedRow") -> None:
        self.active.pop(row, None)


def unpack_bits(words: mx.array, width: int) -> mx.array:
    """llguidance's bitmask (32 tokens per int32, lowest bit first) as booleans over `width`
    logits, expanded on the device: the host sends 1/32 of the bytes. Logits past the
    tokenizer's vocabulary (a model with spare rows) are never allowed."""
    shifts = mx.arange(32, dtype=mx.int32)
    bits = ((words[:, :, None] >> shifts) & 1).reshape(words.shape[0], -1).astype(mx.bool_)
    if bits.shape[1] >= width:
        return bits[:, :width]
    return mx.concatenate([bits, mx.zeros((bits.shape[0], width - bits.shape[1]), mx.bool_)], 1)


class ConstrainedRow:
    """One constrained sequence's sampler: masks the logits, then samples as asked."""

    def __init__(
        self,
        matcher,
        batch: MaskBatch,
        sampler: Callable,
        matcher_vocab: int,
        banned_tokens: bool = False,
        field: str = "constraint",
    ):
        self.matcher = matcher
        # The request field the constraint came from, named when it cannot be followed.
        self.field = field
        self.batch = batch
        self.sampler = sampler
        self.matcher_vocab = matcher_vocab
        # Whether a logits processor may rule tokens out (-inf) that the constraint allows.
        self.banned_tokens = banned_tokens
        self.mask: mx.array | None = None
        # The step whose mask `mask` is, and the token sampled last, not yet consumed.
        self.filled = -1
        self.last: mx.array | None = None
        self.error: Exception | None = None

    def consume(self, token: int) -> None:
        if self.matcher.is_stopped():  # complete: what follows its EOS is never shown
            return
        if not self.matcher.consume_token(token) or self.matcher.is_error():
            self.fail()

    def fail(self) -> None:
        """The matcher gave up (a grammar past llguidance's parser limits): the request's
        constraint cannot be followed, which is the caller's to change."""
        error = self.matcher.get_error() or "the matcher stopped"
        reason = first_line(error.split("<state>")[0])  # not llguidance's state dump
        self.error = InvalidRequest(FieldViolation(self.field, f"cannot be followed: {reason}"))

    def sample(self, logprobs: mx.array) -> mx.array:
        if self.filled != self.batch.step:
            self.batch.fill(logprobs, self)
        if self.error is not None:
            raise self.error
        mask, self.mask = self.mask, None
        assert mask is not None, "fill gives every row it does not fail a mask"
        if self.banned_tokens:
            logprobs = mx.maximum(logprobs, BANNED_FLOOR)
        # Unnormalised is fine: the samplers (categorical, top-p by the total mass, min-p and
        # top-k relative to the best) and argmax need no normalising.
        token = self.sampler(mx.where(mask, logprobs, -mx.inf))
        # Logits that overflowed (a temperature or penalty at the float limits) can make any
        # sampler pick a masked token: then the likeliest allowed one is taken instead.
        allowed = mx.take_along_axis(mask, token.reshape(-1, 1), axis=-1).reshape(-1)
        best = mx.argmax(mx.where(mask, mx.nan_to_num(logprobs), -mx.inf), axis=-1)
        self.last = mx.where(allowed, token, best.astype(token.dtype))
        return self.last

    def incomplete(self, last_token: int) -> bool:
        """Whether the output, ending with `last_token` (not yet consumed), is unfinished."""
        self.matcher.consume_token(last_token)
        return not self.matcher.is_accepting()
