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

from .admission import chat_messages, check_text_size, prompt_field
from .config import EngineConfig
from .errors import EngineOverloaded, FieldViolation, InvalidRequest, ModelNotFound
from .requests import GenerationRequest
from .templates import TemplateRenderer

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
        model = self._model(request.model_id)
        field = prompt_field(request)
        if request.messages is not None:
            if model.tokenizer.chat_template is None:
                raise InvalidRequest(FieldViolation("chat", "the model has no chat template"))
            contents = "".join(m.content for m in request.messages)
            check_text_size(contents, field, context_length, model.max_token_bytes)
            text = await self._renderer.render(
                model.path, chat_messages(request), request.add_generation_prompt
            )
            add_special = False
        else:
            # Exactly one of token_ids, messages, text is set (see GenerationRequest).
            assert request.text is not None, "a generation request without a prompt"
            text = request.text
            # As mlx_lm.generate does: add BOS unless the text already starts with it.
            bos = model.tokenizer.bos_token
            add_special = bos is None or not text.startswith(bos)
        check_text_size(text, field, context_length, model.max_token_bytes)
        if len(text) <= INLINE_TEXT_CHARS:
            return model.tokenizer.encode(text, add_special_tokens=add_special)
        return await self._run(model.tokenizer.encode, text, add_special_tokens=add_special)

    async def tokenize(
        self, model_id: str, text: str, add_special_tokens: bool, return_pieces: bool
    ) -> tuple[list[int], list[str]]:
        model = self._model(model_id)
        if len(text.encode("utf-8", "surrogatepass")) > self.config.max_tokenize_bytes:
            raise InvalidRequest(
                FieldViolation(
                    "text", f"longer than this server's {self.config.max_tokenize_bytes} bytes"
                )
            )
        with self._tokenize_slot():

            def run() -> tuple[list[int], list[str]]:
                ids = model.tokenizer.encode(text, add_special_tokens=add_special_tokens)
                wanted = return_pieces and ids
                pieces = model.tokenizer.batch_decode([[i] for i in ids]) if wanted else []
                return ids, pieces

            return await self._run(run)

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
