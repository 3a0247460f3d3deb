"""The engine: the asyncio facade over the one thread that owns every MLX object.

Callers on the event loop use this class only. It keeps what the loop needs to answer at once
(model descriptions, readers of each request, liveness), and hands everything touching MLX to
the engine thread (scheduler.py) as commands.
"""

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from .config import EngineConfig
from .errors import (
    EngineOverloaded,
    EngineUnavailable,
    ModelAlreadyExists,
    ModelNotFound,
    ModelNotReady,
    RequestAborted,
)
from .events import (
    ErrorOccurred,
    Event,
    EventBus,
    ModelInvalidated,
    RuntimeStatus,
    Subscription,
)
from .models import ModelInfo, ModelSource, ModelState
from .observer import EngineObserver
from .requests import GenerationChunk, GenerationRequest
from .scheduler import END, ModelSlot, Scheduler, Ticket, check_token_ids

log = logging.getLogger(__name__)


class Engine:
    def __init__(
        self, config: EngineConfig = EngineConfig(), observer: EngineObserver | None = None
    ):
        self.config = config
        self.observer = observer or EngineObserver()
        self.events = EventBus()
        self._infos: dict[str, ModelInfo] = {}
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._scheduler: Scheduler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped = asyncio.Event()
        self._running = False
        self._draining = False
        self._dead = False
        self._active = 0
        self._tickets: set[Ticket] = set()
        self._watchdog: asyncio.Task | None = None

    # ---- life cycle (event loop side) -------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._scheduler = Scheduler(
            self.config,
            self.observer,
            self.events,
            self._commands,
            self._loop,
            on_failure=self._fail,
            on_stopped=self._stopped.set,
        )
        self._running = True
        self._thread = threading.Thread(target=self._scheduler.run, name="mlx-engine", daemon=True)
        self._thread.start()
        self._watchdog = asyncio.create_task(self._watch())

    @property
    def _slots(self) -> dict[str, ModelSlot]:
        """The engine thread's models: read them only from there, or when it is quiet."""
        return self._scheduler.slots if self._scheduler else {}

    @property
    def alive(self) -> bool:
        """The engine thread runs and has not died (it may be draining)."""
        return self._running and not self._dead

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def active_requests(self) -> int:
        return self._active

    async def shutdown(self, grace: float | None = None) -> None:
        """Refuse new work, let in-flight requests finish within `grace`, then end the rest."""
        if not self._running:
            return
        self._draining = True
        self.events.publish(Event(RuntimeStatus("shutdown", len(self._slots), self._active)))
        grace = self.config.shutdown_grace_seconds if grace is None else grace
        deadline = time.monotonic() + grace
        while self._active and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if not self._dead:
            await self._call(
                self._scheduler.abort_all, RequestAborted("the server is shutting down")
            )
        self._running = self._scheduler.running = False
        self._commands.put(lambda: None)
        self._watchdog.cancel()
        # A wedged thread may never return: wait for it only a moment then.
        await asyncio.to_thread(self._thread.join, 1.0 if self._dead else None)
        self.events.close()

    # ---- models ----------------------------------------------------------------------

    async def load_model(self, source: ModelSource, model_id: str = "") -> ModelInfo:
        self._check_accepting()
        model_id = model_id or source.default_model_id()
        if model_id in self._infos:
            raise ModelAlreadyExists(model_id)
        self._infos[model_id] = ModelInfo(
            model_id=model_id, source=source, state=ModelState.LOADING
        )
        # A caller that gives up (cancel, deadline) does not stop the load: it finishes and the
        # model stays listed, rather than sitting in memory unlisted.
        return await asyncio.shield(asyncio.ensure_future(self._finish_load(source, model_id)))

    async def _finish_load(self, source: ModelSource, model_id: str) -> ModelInfo:
        try:
            info = await self._call(self._scheduler.load, source, model_id)
        except BaseException:
            self._infos.pop(model_id, None)
            raise
        self._infos[model_id] = info
        return info

    async def unload_model(self, model_id: str) -> None:
        self._check_accepting()
        info = self.get_model(model_id)
        if info.state is not ModelState.READY:
            raise ModelNotReady(model_id, info.state.value)
        await self._call(self._scheduler.unload, model_id)
        self._infos.pop(model_id, None)

    def list_models(self) -> list[ModelInfo]:
        return list(self._infos.values())

    def get_model(self, model_id: str) -> ModelInfo:
        try:
            return self._infos[model_id]
        except KeyError:
            raise ModelNotFound(model_id) from None

    async def warm_up(self) -> None:
        """Generate one token on every ready model, so readiness means a token was produced."""
        for info in self.list_models():
            if info.state is ModelState.READY:
                request = GenerationRequest(model_id=info.model_id, token_ids=(0,), max_tokens=1)
                async for _ in self._generate(request, internal=True):
                    pass

    # ---- tokenizer -------------------------------------------------------------------

    async def tokenize(
        self, model_id: str, text: str, add_special_tokens: bool, return_pieces: bool
    ) -> tuple[list[int], list[str]]:
        tokenizer = self._ready_slot_tokenizer(model_id)

        def run() -> tuple[list[int], list[str]]:
            ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
            pieces = [tokenizer.decode([i]) for i in ids] if return_pieces else []
            return ids, pieces

        return await asyncio.to_thread(run)

    async def detokenize(
        self, model_id: str, token_ids: list[int], skip_special_tokens: bool
    ) -> str:
        tokenizer = self._ready_slot_tokenizer(model_id)
        check_token_ids(token_ids, self._infos[model_id].vocab_size, "token_ids")
        return await asyncio.to_thread(
            tokenizer.decode, token_ids, skip_special_tokens=skip_special_tokens
        )

    def _ready_slot_tokenizer(self, model_id: str):
        self._check_accepting()
        info = self.get_model(model_id)
        if info.state is not ModelState.READY:
            raise ModelNotReady(model_id, info.state.value)
        # Hugging Face fast tokenizers are thread-safe, so tokenize off the engine thread.
        return self._slots[model_id].loaded.tokenizer

    # ---- generation ------------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        return self._generate(request, internal=False)

    async def _generate(self, request: GenerationRequest, internal: bool):
        self._check_accepting()
        info = self.get_model(request.model_id)
        if info.state is not ModelState.READY:
            raise ModelNotReady(request.model_id, info.state.value)
        if self._active >= self.config.max_batch_size + self.config.max_queued_requests:
            raise EngineOverloaded(self.config.retry_after_seconds)
        ticket = Ticket(outbox=asyncio.Queue(), internal=internal)
        self._active += 1
        self._tickets.add(ticket)
        try:
            await self._call(self._scheduler.admit, request, ticket)
            while True:
                chunks = [await ticket.outbox.get()]
                while not ticket.outbox.empty():
                    chunks.append(ticket.outbox.get_nowait())
                for item in chunks:
                    if isinstance(item, BaseException):
                        ticket.finished = True
                        raise item
                ticket.finished = chunks[-1] is END
                if ticket.finished:
                    chunks.pop()
                if chunks:
                    yield merge_chunks(chunks)
                if ticket.finished:
                    return
        finally:
            self._active -= 1
            self._tickets.discard(ticket)
            if not ticket.finished and not self._dead and self._running:
                # FIFO commands: this runs after the admission, even if we left while awaiting it.
                self._commands.put(lambda: self._scheduler.cancel(ticket))

    # ---- events ----------------------------------------------------------------------

    def subscribe(
        self, kinds: frozenset[type] | None = None, model_ids: frozenset[str] | None = None
    ) -> "EventStream":
        """Registered at once, so no event is missed between the call and the first read."""
        return EventStream(self.events, self.events.subscribe(kinds, model_ids))

    async def _watch(self) -> None:
        """Declare the engine dead when one batch step outlives the wedge timeout."""
        timeout = self.config.wedge_timeout_seconds
        while not self._dead:
            await asyncio.sleep(min(0.25, timeout / 4))
            since = self._scheduler.stepping_since
            if since is not None and time.monotonic() - since > timeout:
                self._fail(f"the engine is wedged: a batch step has run for over {timeout:g} s")

    def _fail(self, reason: str) -> None:
        """Event loop: the engine thread died or wedged. End every stream and say so once."""
        if self._dead:
            return
        self._dead = True
        log.error("engine failed: %s", reason)
        error = EngineUnavailable("the engine stopped after an internal error")
        for ticket in self._tickets:
            ticket.outbox.put_nowait(error)
        for model_id in self._slots:
            self.events.publish(Event(ModelInvalidated(model_id, reason), model_id=model_id))
        self.events.publish(Event(ErrorOccurred(reason, code="engine_dead")))
        self.events.publish(Event(RuntimeStatus("error", 0, self._active)))
        self._stopped.set()

    # ---- plumbing --------------------------------------------------------------------

    def _check_accepting(self) -> None:
        if self._dead:
            raise EngineUnavailable("the engine has stopped after an internal error")
        if self._draining:
            raise EngineUnavailable("the server is shutting down")
        if not self._running:
            raise EngineUnavailable("the engine is not running")

    async def _call(self, fn: Callable, *args) -> Any:
        """Run fn on the engine thread and await its result."""
        future = self._loop.create_future()

        def settle(ok: bool, value: Any) -> None:
            if not future.done():
                (future.set_result if ok else future.set_exception)(value)

        def command() -> None:
            try:
                result = (True, fn(*args))
            except Exception as exc:
                result = (False, exc)
            self._scheduler.deliver()  # the command's events reach the loop before its result
            self._scheduler.to_loop(settle, *result)

        self._commands.put(command)
        return await future


class EventStream:
    """An async iterator over one subscription; closing it unsubscribes."""

    def __init__(self, bus: EventBus, subscription: Subscription):
        self._bus = bus
        self.subscription = subscription

    def __aiter__(self) -> "EventStream":
        return self

    async def __anext__(self) -> Event:
        event = await self.subscription.queue.get()
        if event is None:
            self.close()
            raise StopAsyncIteration
        return event

    @property
    def dropped(self) -> int:
        return self.subscription.dropped

    def close(self) -> None:
        self._bus.unsubscribe(self.subscription)

    async def aclose(self) -> None:
        self.close()


def merge_chunks(chunks: list[GenerationChunk]) -> GenerationChunk:
    """A reader that fell behind gets one message for everything it missed."""
    if len(chunks) == 1:
        return chunks[0]
    last = chunks[-1]
    return replace(
        last,
        text="".join(c.text for c in chunks),
        token_ids=tuple(t for c in chunks for t in c.token_ids),
    )
