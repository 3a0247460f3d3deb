"""The facade's tokenizer work: prompts, Tokenize and Detokenize, off the event loop and off
the engine process.

Hugging Face fast tokenizers release the GIL while they encode, so a bounded pool of threads
tokenizes without holding up the event loop; chat templates, which are Python (Jinja) and may
not end, render in killable worker processes (templates.py).
"""

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_lm.tokenizer_utils import load as load_tokenizer

from .admission import (
    chat_messages,
    chat_template_kwargs,
    chat_text,
    chat_tools,
    check_text_size,
    prompt_field,
)
from .config import EngineConfig
from .errors import EngineOverloaded, FieldViolation, InvalidRequest, ModelNotFound
from .requests import GenerationRequest, Tool, ToolCall
from .templates import TemplateRenderer
from .tools import parse_tool_calls, parser_tools

# A text this short is tokenized on the event loop: in tens of microseconds, less than the
# hand-off to a thread, and requests that arrive together reach the engine together.
INLINE_TEXT_CHARS = 2048


@dataclass(frozen=True)
class PromptModel:
    """What the facade keeps of a ready model to turn text into its tokens."""

    tokenizer: Any
    path: Path
    # Bytes in the vocabulary's longest token: a text longer than context × this (with a
    # margin) cannot fit in the context, whatever its tokens (see check_text_size).
    max_token_bytes: int


def read_prompt_model(path: Path) -> PromptModel:
    tokenizer = load_tokenizer(path)
    vocabulary = tokenizer.get_vocab()
    longest = max((len(token.encode("utf-8", "surrogatepass")) for token in vocabulary), default=1)
    return PromptModel(tokenizer, path, longest)


@dataclass(frozen=True)
class TokenizeOptions:
    """What a Tokenize call wants besides the token ids."""

    add_special_tokens: bool = False
    return_pieces: bool = False
    return_offsets: bool = False
    count_only: bool = False


@dataclass(frozen=True)
class Tokenized:
    """One text's tokens; with count_only, only their count."""

    count: int
    token_ids: tuple[int, ...] = ()
    pieces: tuple[str, ...] = ()
    # (start, end) of each token's text, as Python string indices: text[start:end].
    offsets: tuple[tuple[int, int], ...] = ()


def check_tokenize_size(texts: list[str], field: str, limit: int) -> None:
    """One limit for all of a call's texts together: a thousand texts cost a thousand times one."""
    size = sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)
    if size > limit:
        what = "longer" if len(texts) == 1 else "together longer"
        raise InvalidRequest(FieldViolation(field, f"{what} than this server's {limit} bytes"))


def check_offsets_supported(tokenizer: Any, options: TokenizeOptions) -> None:
    """Only fast (Rust) tokenizers track where each token came from."""
    if options.return_offsets and not options.count_only and not tokenizer.is_fast:
        raise InvalidRequest(
            FieldViolation("return_offsets", "this model's tokenizer cannot tell token offsets")
        )


def tokenize_texts(tokenizer: Any, texts: list[str], options: TokenizeOptions) -> list[Tokenized]:
    """All texts in one call: a fast tokenizer encodes the batch in parallel, without the GIL.

    The offsets come from the `tokenizers` library, which counts characters (code points), not
    bytes: Python string indices as they are. A special token the tokenizer adds (BOS) covers
    no text, so its offsets are (0, 0).
    """
    offsets_wanted = options.return_offsets and not options.count_only
    encoded = tokenizer._tokenizer(
        texts,
        add_special_tokens=options.add_special_tokens,
        return_offsets_mapping=offsets_wanted,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    ids: list[list[int]] = encoded["input_ids"]
    if options.count_only:
        return [Tokenized(count=len(text_ids)) for text_ids in ids]
    offsets = encoded["offset_mapping"] if offsets_wanted else [[] for _ in ids]
    pieces = token_pieces(tokenizer, ids) if options.return_pieces else [[] for _ in ids]
    return [
        Tokenized(len(text_ids), tuple(text_ids), tuple(text_pieces), tuple(map(tuple, spans)))
        for text_ids, text_pieces, spans in zip(ids, pieces, offsets, strict=True)
    ]


def token_pieces(tokenizer: Any, ids: list[list[int]]) -> list[list[str]]:
    """The text of each token of each text, all decoded in one batch."""
    flat = [[token_id] for text_ids in ids for token_id in text_ids]
    decoded = tokenizer.batch_decode(flat) if flat else []
    pieces, start = [], 0
    for text_ids in ids:
        pieces.append(decoded[start : start + len(text_ids)])
        start += len(text_ids)
    return pieces


class Prompts:
    def __init__(self, config: EngineConfig):
        self.config = config
        self._threads = ThreadPoolExecutor(
            config.tokenizer_threads, thread_name_prefix="mlx-serving-tokenizer"
        )
        self._renderer = TemplateRenderer(
            config.chat_template_workers, config.chat_template_timeout_seconds
        )
        self._models: dict[str, PromptModel] = {}
        self._tokenize_calls = 0

    async def add_model(self, model_id: str, path: Path) -> None:
        self._models[model_id] = await asyncio.to_thread(read_prompt_model, path)

    def remove_model(self, model_id: str) -> None:
        self._models.pop(model_id, None)

    def _model(self, model_id: str) -> PromptModel:
        try:
            return self._models[model_id]
        except KeyError:  # unloaded while the request waited
            raise ModelNotFound(model_id) from None

    async def encode(self, request: GenerationRequest, context_length: int) -> list[int]:
        """The prompt's token ids; a text that cannot fit is refused before it is tokenized."""
        if request.token_ids is not None:
            return list(request.token_ids)
        _, ids = await self.prompt(request, context_length)
        return ids

    async def render_chat(
        self, request: GenerationRequest, context_length: int
    ) -> tuple[str, list[int]]:
        """RenderChatTemplate: the chat's prompt as generation makes it, under Tokenize's limit
        on concurrent calls."""
        with self._tokenize_slot():
            return await self.prompt(request, context_length)

    async def prompt(
        self, request: GenerationRequest, context_length: int
    ) -> tuple[str, list[int]]:
        """A text or chat prompt's text as the model reads it, and its token ids."""
        model = self._model(request.model_id)
        field = prompt_field(request)
        if request.messages is not None:
            text = await self._render(model, request, context_length)
            add_special = False
        else:
            # Exactly one of token_ids, messages, text is set (see GenerationRequest).
            assert request.text is not None, "a generation request without a prompt"
            text = request.text
            # As mlx_lm.generate does: add BOS unless the text already starts with it.
            bos = model.tokenizer.bos_token
            add_special = bos is None or not text.startswith(bos)
        if request.truncate_prompt_tokens is None:  # else any length is cut to fit
            check_text_size(text, field, context_length, model.max_token_bytes)
        if len(text) <= INLINE_TEXT_CHARS:
            return text, model.tokenizer.encode(text, add_special_tokens=add_special)
        return text, await self._run(model.tokenizer.encode, text, add_special_tokens=add_special)

    async def _render(
        self, model: PromptModel, request: GenerationRequest, context_length: int
    ) -> str:
        if model.tokenizer.chat_template is None:
            raise InvalidRequest(FieldViolation("chat", "the model has no chat template"))
        field = prompt_field(request)
        if request.truncate_prompt_tokens is None:
            check_text_size(chat_text(request), field, context_length, model.max_token_bytes)
        return await self._renderer.render(
            model.path,
            chat_messages(request),
            request.add_generation_prompt,
            chat_tools(request),
            chat_template_kwargs(request),
        )

    def tokenizer(self, model_id: str):
        """The model's mlx-lm TokenizerWrapper (ModelNotFound once unloaded)."""
        return self._model(model_id).tokenizer

    def parse_tool_calls(
        self, model_id: str, text: str, tools: tuple[Tool, ...] = ()
    ) -> tuple[ToolCall, ...]:
        """The tool calls in a model's output; none once the model is unloaded."""
        model = self._models.get(model_id)
        if model is None:
            return ()
        return parse_tool_calls(model.tokenizer, text, parser_tools(tools))

    async def tokenize(
        self, model_id: str, texts: list[str], field: str, options: TokenizeOptions
    ) -> list[Tokenized]:
        """`texts` in one batch under one tokenize slot; `field` names them in a refusal."""
        model = self._model(model_id)
        check_tokenize_size(texts, field, self.config.max_tokenize_bytes)
        check_offsets_supported(model.tokenizer, options)
        with self._tokenize_slot():
            return await self._run(tokenize_texts, model.tokenizer, texts, options)

    async def detokenize(self, model_id: str, ids: list[int], skip_special_tokens: bool) -> str:
        model = self._model(model_id)
        with self._tokenize_slot():
            return await self._run(
                model.tokenizer.decode, ids, skip_special_tokens=skip_special_tokens
            )

    @contextlib.contextmanager
    def _tokenize_slot(self):
        """Admission for Tokenize and Detokenize: beyond the limit, retry later."""
        if self._tokenize_calls >= self.config.max_concurrent_tokenize:
            raise EngineOverloaded(self.config.retry_after_seconds)
        self._tokenize_calls += 1
        try:
            yield
        finally:
            self._tokenize_calls -= 1

    async def _run(self, fn, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, lambda: fn(*args, **kwargs))

    def close(self) -> None:
        self._renderer.close()
        self._threads.shutdown(wait=False, cancel_futures=True)
