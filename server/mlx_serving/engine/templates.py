"""Chat templates rendered in worker processes, under a time limit.

A chat template is a Jinja program that comes with the model, and a template can loop for as
long as it likes: rendered on a thread it would hold the GIL, and nothing can stop a thread.
A worker process can be killed, so each render gets `timeout` seconds and a worker that
overruns is killed and replaced; the event loop and the engine process never wait for one.
"""

import asyncio
import logging
import multiprocessing
import time
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any

from .errors import FieldViolation, InvalidRequest

log = logging.getLogger(__name__)

PROCESS_CONTEXT = multiprocessing.get_context("spawn")
# How long a worker may take to start and read a model's tokenizer: our work, not the template.
PREPARE_SECONDS = 120.0
# Tokenizers a worker keeps, most recently used last.
CACHED_TOKENIZERS = 8


class TemplateRenderer:
    """A pool of `workers` render processes, each started at its first render."""

    def __init__(self, workers: int, timeout: float):
        self.timeout = timeout
        self._idle: asyncio.Queue[RenderWorker] = asyncio.Queue()
        for _ in range(workers):
            self._idle.put_nowait(RenderWorker())

    async def render(
        self,
        model_path: Path,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """The chat as the model's template renders it; InvalidRequest if the template fails
        or runs past the time limit."""
        worker = await self._idle.get()
        job = (str(model_path), messages, add_generation_prompt, tools, template_kwargs or {})
        try:
            ok, value = await asyncio.to_thread(worker.run, job, self.timeout)
        finally:
            self._idle.put_nowait(worker)
        if not ok:
            raise InvalidRequest(FieldViolation("chat.messages", value))
        return value

    def close(self) -> None:
        while not self._idle.empty():
            self._idle.get_nowait().stop()


class RenderWorker:
    """One render process and its pipe; `run` is called on a thread, by one caller at a time."""

    def __init__(self) -> None:
        # Both set by _start, both cleared by stop.
        self._process: SpawnProcess | None = None
        self._conn: Connection | None = None

    def run(self, job: tuple, timeout: float) -> tuple[bool, str]:
        if self._process is None or not self._process.is_alive():
            self._start()
        conn = self._conn
        assert conn is not None, "a render worker's process runs without its pipe"
        try:
            conn.send(job)
            # First the worker says it holds the tokenizer, then it renders against the clock.
            if not conn.poll(PREPARE_SECONDS):
                raise TimeoutError
            ready, message = conn.recv()
            if not ready:
                return False, message
            started = time.monotonic()
            if not conn.poll(timeout):
                log.warning("a chat template ran past %g s; its worker was killed", timeout)
                self.stop()
                return False, f"the model's chat template ran for more than {timeout:g} s"
            log.debug("rendered a chat in %.1f ms", (time.monotonic() - started) * 1e3)
            return conn.recv()
        except (EOFError, OSError, TimeoutError):
            self.stop()
            return False, "the chat template's worker process failed"

    def _start(self) -> None:
        ours, theirs = PROCESS_CONTEXT.Pipe()
        self._process = PROCESS_CONTEXT.Process(
            target=serve_renders, args=(theirs,), name="mlx-serving-templates", daemon=True
        )
        self._process.start()
        theirs.close()
        self._conn = ours

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join()
            if self._conn is not None:
                self._conn.close()
            self._process = self._conn = None


def serve_renders(conn: Connection) -> None:
    """The worker's main: for each job, say whether the tokenizer is ready, then render."""
    import signal

    from mlx_lm.tokenizer_utils import load as load_tokenizer

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server handles Ctrl-C, and kills us
    tokenizers: dict[str, object] = {}
    while True:
        try:
            path, *chat = conn.recv()
        except EOFError:
            return
        try:
            tokenizer = tokenizers.pop(path, None) or load_tokenizer(Path(path))
            tokenizers[path] = tokenizer
            while len(tokenizers) > CACHED_TOKENIZERS:
                tokenizers.pop(next(iter(tokenizers)))
        except Exception as exc:
            conn.send((False, f"the model's tokenizer could not be read: {type(exc).__name__}"))
            continue
        conn.send((True, ""))
        conn.send(render_chat(tokenizer, *chat))


def render_chat(
    tokenizer,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None = None,
    template_kwargs: dict[str, Any] | None = None,
):
    """(True, text), or (False, why) when the template raises (it may on purpose: many check
    the roles' order)."""
    try:
        text = tokenizer.apply_chat_template(
            messages,
            tools=tools,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **(template_kwargs or {}),
        )
    except Exception as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        return False, f"the model's chat template failed: {reason}"
    return True, text
