"""The engine: the asyncio facade over the process that owns every MLX object.

Callers on the event loop use this class only. It keeps what the loop needs to answer at once
(model descriptions, tokenizers, readers of each request, liveness), and hands everything
touching MLX to the engine process (scheduler.py) as commands. A reader thread takes the
process's results off the pipe and hands them to the loop, once per step.
"""

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable
from ctypes import c_double
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any, TypeVar

from .admission import Admission, admit, check_limits, check_token_ids
from .config import EngineConfig, allocator_environment, mlx_environment
from .constraints import check_constraint, tool_call_constraint
from .errors import (
    DraftIncompatible,
    EngineOverloaded,
    EngineUnavailable,
    FieldViolation,
    InvalidRequest,
    LoadCapReached,
    LoadingDisabled,
    LoadRefused,
    ModelAlreadyExists,
    ModelLoadFailed,
    ModelNotFound,
    ModelNotReady,
    RequestAborted,
    ShuttingDown,
    TokenizeOverloaded,
)
from .events import (
    ErrorOccurred,
    Event,
    EventBus,
    ModelInvalidated,
    ModelUnloaded,
    RuntimeStatus,
    Subscription,
)
from .models import DEFAULT_DRAFT_TOKENS, LoadPolicy, ModelInfo, ModelSource, ModelState
from .observer import EngineObserver, replay
from .prompts import Prompts, Tokenized, TokenizeOptions
from .protocol import (
    END,
    AbortAll,
    Admit,
    Call,
    Cancel,
    Died,
    Failure,
    Load,
    LoadProgress,
    Observe,
    Pair,
    Result,
    StepOutput,
    Stop,
    Stopped,
    Unload,
    WatchTokens,
)
from .requests import (
    TOOL_CHOICE_AUTO,
    TOOL_CHOICE_NONE,
    GenerationChunk,
    GenerationRequest,
    Tool,
    ToolCall,
    Usage,
)
from .sources import check_source_allowed, vet_model

log = logging.getLogger(__name__)

# Spawned, never forked: a fork would copy the server's gRPC and thread state.
PROCESS_CONTEXT = multiprocessing.get_context("spawn")

T = TypeVar("T")

# tool_choice values that leave the output free (the others force a call).
FREE_TOOL_CHOICES = frozenset({TOOL_CHOICE_AUTO, TOOL_CHOICE_NONE})

# A restarted engine that has served this long has recovered: its next failure starts a new
# run of restarts (engine.max_engine_restarts counts failures in a row).
RECOVERED_SECONDS = 60.0
# How long to wait for a killed or exited engine process to be gone.
REAP_SECONDS = 5.0


@dataclass(eq=False)
class Ticket:
    """The reader's side of one request: what the engine process sends for `rid` lands here."""

    rid: int
    outbox: asyncio.Queue
    finished: bool = False


class Engine:
    def __init__(
        self,
        config: EngineConfig = EngineConfig(),
        observer: EngineObserver | None = None,
        policy: LoadPolicy | None = None,
    ):
        self.config = config
        # What a client's LoadModel may load (load_model's `requested`); by default anything
        # but a model's own code.
        self.policy = policy or LoadPolicy()
        # The loads in flight by model id: an identical LoadModel awaits the one running.
        self._loads: dict[str, asyncio.Future] = {}
        self._observer = observer or EngineObserver()
        self.events = EventBus()
        self._infos: dict[str, ModelInfo] = {}
        self._prompts = Prompts(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        # Set by start(), with the threads and the watchdog below.
        self._process: SpawnProcess | None = None
        self._commands: Connection | None = None
        self._results: Connection | None = None
        self._heartbeat: c_double | None = None  # a shared RawValue("d"): lock=False
        self._reader: threading.Thread | None = None
        # Commands to the engine process, written by a thread: a busy engine's full pipe must
        # not block the event loop.
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._calls: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._stopped = asyncio.Event()
        self._running = False
        self._draining = False
        self._dead = False
        self._active = 0
        self._tickets: dict[int, Ticket] = {}
        self._token_events = False
        self._watchdog: asyncio.Task | None = None
        # Restarts (see _fail): which process is current, so that a dead one's late replies
        # reach no one; the failures in a row; the models a restart loads again.
        self._generation = 0
        self._failures = 0
        self._serving_since = 0.0
        self._restarting = False
        self._gave_up = False
        self._restoring: list[ModelInfo] = []
        self._restarter: asyncio.Task | None = None
        self._state_changed = asyncio.Event()

    # ---- life cycle (event loop side) -------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._spawn()
        self._running = True
        self._serving_since = time.monotonic()
        self._post(Observe(self._records(self._observer)))

    async def _spawn(self) -> None:
        """Start an engine process with pipes, threads and a watchdog of its own."""
        commands_out, commands_in = PROCESS_CONTEXT.Pipe(duplex=False)
        results_out, results_in = PROCESS_CONTEXT.Pipe(duplex=False)
        heartbeat = PROCESS_CONTEXT.Value("d", 0.0, lock=False)
        process = PROCESS_CONTEXT.Process(
            target=run_engine_process,
            args=(self.config, commands_out, results_in, heartbeat, log.getEffectiveLevel()),
            name="mlx-engine",
            daemon=True,
        )
        # Set before the start, so that a shutdown that cancels a restart finds them to close.
        self._process, self._heartbeat = process, heartbeat
        self._commands, self._results = commands_in, results_out
        with environment(mlx_environment(self.config), allocator_environment(self.config)):
            await start_process(process)
        log.info("engine process started (pid %d)", process.pid)
        commands_out.close()
        results_in.close()
        outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._outbox = outbox
        generation = self._generation
        self._reader = threading.Thread(
            target=self._read,
            args=(generation, results_out, process),
            name="mlx-engine-reader",
            daemon=True,
        )
        self._reader.start()
        self._writer = threading.Thread(
            target=self._write, args=(commands_in, outbox), name="mlx-engine-writer", daemon=True
        )
        self._writer.start()
        self._watchdog = asyncio.create_task(self._watch(generation, heartbeat))

    @property
    def observer(self) -> EngineObserver:
        return self._observer

    @observer.setter
    def observer(self, observer: EngineObserver) -> None:
        self._observer = observer
        if self._running and not self._dead:
            self._post(Observe(self._records(observer)))

    @staticmethod
    def _records(observer: EngineObserver) -> bool:
        return type(observer) is not EngineObserver

    @property
    def alive(self) -> bool:
        """The engine process runs, has not died and is not being restarted (it may be
        draining)."""
        return self._running and not self._dead and not self._restarting

    @property
    def gave_up(self) -> bool:
        """The engine failed and will not be restarted (engine.max_engine_restarts)."""
        return self._gave_up

    @property
    def process_id(self) -> int | None:
        """The current engine process's pid (a restart starts a new one)."""
        return self._process.pid if self._process is not None else None

    async def wait_stopped(self) -> None:
        """Until the engine has stopped for good: shut down, or failed and not restarted."""
        await self._stopped.wait()

    async def wait_state_change(self) -> None:
        """Until the engine next fails, comes back from a restart, or stops."""
        await self._state_changed.wait()

    def _state_change(self) -> None:
        self._state_changed.set()
        self._state_changed = asyncio.Event()

    def active_requests(self) -> int:
        return self._active

    async def shutdown(self, grace: float | None = None) -> None:
        """Refuse new work, let in-flight requests finish within `grace`, then end the rest."""
        if not self._running:
            return
        self._draining = True
        await self._cancel_restart()
        process, watchdog = started(self._process), started(self._watchdog)
        reader, writer = started(self._reader), started(self._writer)
        commands, results = started(self._commands), started(self._results)
        self.events.publish(Event(RuntimeStatus("shutdown", self._ready_models(), self._active)))
        grace = self.config.shutdown_grace_seconds if grace is None else grace
        deadline = time.monotonic() + grace
        while self._active and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        # The process may die meanwhile (its streams then end with EngineUnavailable): still
        # clean up below.
        with contextlib.suppress(EngineUnavailable):
            if not self._dead:
                await self._call(AbortAll("the server is shutting down"))
                self._post(Stop())
        self._running = False
        watchdog.cancel()
        self._outbox.put(None)
        self._prompts.close()
        # A wedged process may never return: wait for it only a moment then.
        await asyncio.to_thread(process.join, 1.0 if self._dead else 30.0)
        if process.is_alive():
            process.kill()
            await asyncio.to_thread(process.join)
        await asyncio.to_thread(writer.join)
        commands.close()
        await asyncio.to_thread(reader.join)
        results.close()
        self.events.close()
        self._stopped.set()
        self._state_change()

    # ---- models ----------------------------------------------------------------------

    async def load_model(
        self,
        source: ModelSource,
        model_id: str = "",
        requested: bool = False,
        draft_model_id: str = "",
        draft_tokens: int | None = None,
        draft_source: ModelSource | None = None,
    ) -> ModelInfo:
        """The model from `source` as `model_id` (if empty, the source's default id).

        `requested`: a client's LoadModel, which the load policy governs; the operator's own
        models (config `models`, `--model`) load whatever it says. The same source under the
        same id again gets the model there, or shares its load under way; another source under
        a loaded id is ModelAlreadyExists. `draft_model_id`: a ready model to pair with this
        one as its draft (speculative decoding, speculative.py), `draft_tokens` per step by
        default; a pairing that fails (DraftIncompatible) leaves the model unloaded.
        `draft_source`: a draft loaded first as "<model_id>-draft" (unloaded again if this
        model fails to load or pair, unless it was there before).
        """
        self._check_accepting()
        if requested and not self.policy.allow_loading:
            raise LoadingDisabled(model_id)
        model_id = model_id or source.default_model_id()
        if draft_source is not None:
            return await self._load_with_draft(
                source, model_id, requested, draft_source, draft_tokens
            )
        if model_id in self._infos:
            return await self._loaded_already(model_id, source)
        if draft_model_id:
            self._check_draft(model_id, draft_model_id)
        if requested:
            self._check_request_allowed(source, model_id)
        self._infos[model_id] = ModelInfo(
            model_id=model_id, source=source, state=ModelState.LOADING
        )
        draft = (draft_model_id, draft_tokens or DEFAULT_DRAFT_TOKENS) if draft_model_id else None
        load = self._loads[model_id] = asyncio.ensure_future(
            self._finish_load(source, model_id, requested, draft)
        )
        # A caller that gives up (cancel, deadline) does not stop the load: it finishes and the
        # model stays listed, rather than sitting in memory unlisted.
        return await asyncio.shield(load)

    async def _loaded_already(self, model_id: str, source: ModelSource) -> ModelInfo:
        """An identical LoadModel is answered with the model, not refused: a client retrying a
        load it lost the answer to must not see it fail."""
        info = self._infos[model_id]
        if info.source != source:
            raise ModelAlreadyExists(model_id)
        load = self._loads.get(model_id)
        return info if load is None else await asyncio.shield(load)

    def _check_request_allowed(self, source: ModelSource, model_id: str) -> None:
        """What refuses a client's load before any file is touched: its repository, its
        revision, a full house."""
        try:
            check_source_allowed(source, self.policy)
        except LoadRefused as exc:
            exc.model_id = model_id
            raise
        cap = self.policy.max_loaded_models
        if cap and len(self._infos) >= cap:
            raise LoadCapReached(
                f"this server holds {len(self._infos)} models, its most (max_loaded_models); "
                "unload one first",
                model_id,
            )

    async def _finish_load(
        self,
        source: ModelSource,
        model_id: str,
        requested: bool,
        draft: tuple[str, int] | None = None,
    ) -> ModelInfo:
        try:
            found_at = source
            if requested:
                found = await asyncio.to_thread(vet_model, source, self.policy)
                self._count_weight_bytes(model_id, found.weight_bytes)
                # The directory vetted, not the path again: a link changed since is not followed.
                found_at = ModelSource(local_path=str(found.path))
            info, path = await self._call(Load(found_at, model_id))
            if draft is not None:
                info = await self._pair_or_unload(model_id, *draft)
            # The facade's own tokenizer: prompts are tokenized here, not in the engine process.
            await self._prompts.add_model(model_id, Path(path))
        except BaseException as exc:
            self._infos.pop(model_id, None)
            if isinstance(exc, (ModelLoadFailed, LoadRefused)) and not exc.model_id:
                exc.model_id = model_id  # the engine process names only the source
            raise
        else:
            info = self._infos[model_id] = replace(info, source=source)
            return info
        finally:
            self._loads.pop(model_id, None)

    async def _load_with_draft(
        self,
        source: ModelSource,
        model_id: str,
        requested: bool,
        draft_source: ModelSource,
        draft_tokens: int | None,
    ) -> ModelInfo:
        draft_id = f"{model_id[:122]}-draft"
        there = draft_id in self._infos
        await self.load_model(draft_source, draft_id, requested)
        try:
            return await self.load_model(source, model_id, requested, draft_id, draft_tokens)
        except BaseException:
            if not there and draft_id in self._infos:
                with contextlib.suppress(Exception):
                    await self.unload_model(draft_id)
            raise

    def _check_draft(self, model_id: str, draft_model_id: str) -> None:
        """What refuses a pairing before anything loads (the engine process checks the rest)."""
        draft = self._infos.get(draft_model_id)
        if draft is None or draft.state is not ModelState.READY:
            state = "not loaded" if draft is None else draft.state.value
            raise DraftIncompatible(
                f"draft model {draft_model_id!r} is {state}: load it first", model_id
            )
        if draft_model_id == model_id or draft.draft_model_id:
            raise DraftIncompatible(
                f"{draft_model_id!r} cannot draft for {model_id!r}: it has a draft of its own",
                model_id,
            )

    async def _pair_or_unload(self, model_id: str, draft_model_id: str, tokens: int) -> ModelInfo:
        """Pair the model just loaded with its draft; if they cannot pair, unload it again."""
        try:
            return await self._call(Pair(model_id, draft_model_id, tokens))
        except DraftIncompatible:
            with contextlib.suppress(Exception):
                await self._call(Unload(model_id))
            raise

    def _count_weight_bytes(self, model_id: str, size: int) -> None:
        """Hold a client's model's weights (their headers' size) against max_loaded_bytes before
        a byte of them is read, all models together."""
        cap = self.policy.max_loaded_bytes
        held = sum(info.weight_bytes for other, info in self._infos.items() if other != model_id)
        if cap and held + size > cap:
            raise LoadCapReached(
                f"its {size} bytes of weights would take the models held past {cap} bytes "
                "(max_loaded_bytes); unload one first",
                model_id,
            )
        self._infos[model_id] = replace(self._infos[model_id], weight_bytes=size)

    async def unload_model(self, model_id: str, requested: bool = False) -> None:
        """`requested`: a client's UnloadModel, refused when the policy forbids loading."""
        self._check_accepting()
        if requested and not self.policy.allow_loading:
            raise LoadingDisabled(model_id)
        info = self.get_model(model_id)
        if info.state is not ModelState.READY:
            raise ModelNotReady(model_id, info.state.value)
        await self._call(Unload(model_id))
        self._infos.pop(model_id, None)
        self._prompts.remove_model(model_id)
        for other, paired in self._infos.items():  # the pair is dissolved (speculative.py)
            if paired.draft_model_id == model_id:
                self._infos[other] = replace(paired, draft_model_id="", draft_tokens=0)

    def list_models(self) -> list[ModelInfo]:
        return list(self._infos.values())

    def _ready_models(self) -> int:
        if self._dead:
            return 0
        return sum(info.state is ModelState.READY for info in self._infos.values())

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
        self, model_id: str, texts: list[str], field: str, options: TokenizeOptions
    ) -> list[Tokenized]:
        """One result per text; `field` is the request field that holds them (for errors)."""
        self._ready_model(model_id)
        # Prompts refuses calls past max_concurrent_tokenize as EngineOverloaded: say which
        # limit it was. Raised outside the `except`, so the new error holds no other.
        try:
            return await self._prompts.tokenize(model_id, texts, field, options)
        except EngineOverloaded as exc:
            retry_after = exc.retry_after
        raise TokenizeOverloaded(retry_after)

    async def detokenize(
        self, model_id: str, token_ids: list[int], skip_special_tokens: bool
    ) -> str:
        check_token_ids(token_ids, self._ready_model(model_id).vocab_size, "token_ids")
        try:
            return await self._prompts.detokenize(model_id, token_ids, skip_special_tokens)
        except EngineOverloaded as exc:
            retry_after = exc.retry_after
        raise TokenizeOverloaded(retry_after)

    async def render_chat(self, request: GenerationRequest) -> tuple[str, list[int]]:
        """A chat request's prompt, text and token ids, exactly as generation would make it;
        counted as a Tokenize call."""
        assert request.messages is not None, "render_chat of a request without a chat"
        info = self._ready_model(request.model_id)
        context = info.context_length or self.config.default_context_length
        try:
            return await self._prompts.render_chat(request, context)
        except EngineOverloaded as exc:
            retry_after = exc.retry_after
        raise TokenizeOverloaded(retry_after)

    def parse_tool_calls(
        self, model_id: str, text: str, tools: tuple[Tool, ...] = ()
    ) -> tuple[ToolCall, ...]:
        """The complete tool calls in a model's output `text`, parsed with mlx-lm's parser for
        the model's family (`tools`, the request's, type the arguments of some families); ()
        for a model without tool calling. Never raises."""
        return self._prompts.parse_tool_calls(model_id, text, tools)

    def _ready_model(self, model_id: str) -> ModelInfo:
        self._check_accepting()
        info = self.get_model(model_id)
        if info.state is not ModelState.READY:
            raise ModelNotReady(model_id, info.state.value)
        return info

    # ---- generation ------------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        return self._generate(request, internal=False)

    async def _generate(
        self, request: GenerationRequest, internal: bool
    ) -> AsyncGenerator[GenerationChunk, None]:
        info = self._ready_model(request.model_id)
        # max_batch_size 0: the model's own, derived when it loaded.
        batch_size = self.config.max_batch_size or info.max_batch_size
        if self._active + request.n > batch_size + self.config.max_queued_requests:
            raise EngineOverloaded(self.config.retry_after_seconds)
        self._active += request.n
        try:
            check_limits(request, self.config)
            if request.constraint is not None:
                check_constraint(request.constraint, self.config.max_constraint_bytes)
            if request.messages is not None and request.tool_choice not in FREE_TOOL_CHOICES:
                request = self._force_tool_call(request)
            context = info.context_length or self.config.default_context_length
            prompt = await self._prompts.encode(request, context)
            admission = admit(info, request, prompt, context, self.config)
            del prompt
            self._check_accepting()  # a shutdown may have begun while the prompt was encoded
            if request.n == 1:
                samples = self._sample(admission, internal)
            else:
                samples = self._samples(admission, internal)
            del admission
            async with contextlib.aclosing(samples):
                async for chunk in samples:
                    yield chunk
        finally:
            self._active -= request.n

    def _force_tool_call(self, request: GenerationRequest) -> GenerationRequest:
        """tool_choice "required" or a tool's name, as a constraint on the output."""
        if request.constraint is not None:
            field = f"chat.tool_choice and {request.constraint.kind}"
            raise InvalidRequest(FieldViolation(field, "a forced tool call is a constraint"))
        tokenizer = self._prompts.tokenizer(request.model_id)
        constraint = tool_call_constraint(tokenizer, request.tools, request.tool_choice)
        check_constraint(constraint, self.config.max_constraint_bytes, field="chat.tools")
        return replace(request, constraint=constraint)

    async def _samples(
        self, admission: Admission, internal: bool
    ) -> AsyncGenerator[GenerationChunk, None]:
        """GenerateRequest.n samples of one prompt, each with its own seed, the first one's
        prefill shared by the others; their chunks in the order they come."""
        merged: asyncio.Queue = asyncio.Queue()
        leader = next(self._ids)
        seed = admission.request.sampling.seed
        assert seed is not None, "admit draws a seed for every request"

        async def pump(index: int) -> None:
            request = replace(
                admission.request,
                n=1,
                sampling=replace(admission.request.sampling, seed=(seed + index) % (1 << 64)),
                prompt_logprobs=admission.request.prompt_logprobs if index == 0 else None,
            )
            sample = replace(admission, request=request)
            rid = leader if index == 0 else next(self._ids)
            try:
                async with contextlib.aclosing(
                    self._sample(sample, internal, rid, index, None if index == 0 else leader)
                ) as chunks:
                    async for chunk in chunks:
                        merged.put_nowait(chunk)
                merged.put_nowait(index)
            except Exception as exc:
                merged.put_nowait(exc)

        n = admission.request.n
        tasks = [asyncio.create_task(pump(index)) for index in range(n)]
        finished: list[GenerationChunk] = []
        try:
            while len(finished) < n:
                item = await merged.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, int):
                    continue
                if item.finish_reason is not None:
                    finished.append(item)
                    if len(finished) == n:
                        item = replace(item, total_usage=total_usage(finished))
                yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _sample(
        self,
        admission: Admission,
        internal: bool,
        rid: int | None = None,
        index: int = 0,
        fork_of: int | None = None,
    ) -> AsyncGenerator[GenerationChunk, None]:
        """One sample's stream: post it to the engine process and read what it sends back."""
        ticket = Ticket(rid=next(self._ids) if rid is None else rid, outbox=asyncio.Queue())
        self._tickets[ticket.rid] = ticket
        first = True
        request = admission.request
        # The output so far, when its tool calls are to be parsed at the end.
        output: list[str] | None = None
        if request.tools and request.tool_choice != TOOL_CHOICE_NONE:
            output = []
        try:
            self._post(Admit(admission, ticket.rid, internal, fork_of))
            seed = request.sampling.seed
            del admission
            while not ticket.finished:
                items = [await ticket.outbox.get()]
                while not ticket.outbox.empty():
                    items.append(ticket.outbox.get_nowait())
                chunks = [item for item in items if isinstance(item, GenerationChunk)]
                error = items[-1] if isinstance(items[-1], BaseException) else None
                ticket.finished = error is not None or items[-1] == END
                if chunks:
                    chunk = merge_chunks(chunks)
                    if index or first:
                        chunk = replace(chunk, index=index, seed=seed if first else None)
                        first = False
                    if output is not None:
                        output.append(chunk.text)
                        if chunk.finish_reason is not None:
                            calls = self.parse_tool_calls(
                                request.model_id, "".join(output), request.tools
                            )
                            chunk = replace(chunk, tool_calls=calls)
                    yield chunk
                if error is not None:
                    if isinstance(error, RequestAborted) and self._draining:
                        # Ended by the shutdown, not an unload: worth retrying elsewhere.
                        error.retry_after = self.config.retry_after_seconds
                    # Our frame must not hold the error its traceback holds: that cycle would
                    # keep the request alive until the garbage collector's next full pass.
                    del items, chunks
                    try:
                        raise error
                    finally:
                        error = None
        finally:
            del self._tickets[ticket.rid]
            if not ticket.finished and not self._dead and self._running:
                # FIFO commands: this runs after the admission.
                with contextlib.suppress(EngineUnavailable):  # a dead process runs nothing
                    self._post(Cancel(ticket.rid))

    # ---- events ----------------------------------------------------------------------

    def subscribe(
        self, kinds: frozenset[type] | None = None, model_ids: frozenset[str] | None = None
    ) -> "EventStream":
        """Registered at once, so no event is missed between the call and the first read."""
        stream = EventStream(self.events, self.events.subscribe(kinds, model_ids), self)
        self.sync_token_events()
        return stream

    def sync_token_events(self) -> None:
        """Tell the engine process whether anyone wants TokenGenerated (they cost per token)."""
        wanted = self.events.token_subscribers > 0
        if wanted != self._token_events and self._running and not self._dead:
            self._token_events = wanted
            self._post(WatchTokens(wanted))

    async def _watch(self, generation: int, heartbeat: Any) -> None:
        """Declare the engine dead when it shows no progress for the wedge timeout: its loop
        beats at every command, every batch step and every idle wait (see Scheduler.run)."""
        timeout = self.config.wedge_timeout_seconds
        while generation == self._generation:
            await asyncio.sleep(min(0.25, timeout / 4))
            beat = heartbeat.value
            if generation == self._generation and beat and time.monotonic() - beat > timeout:
                self._fail(f"the engine is wedged: no progress for over {timeout:g} s")

    def _fail(self, reason: str) -> None:
        """Event loop: the engine process died or wedged. End every stream and say so once, then
        restart the process, or give up after max_engine_restarts failures in a row."""
        if self._dead:
            return
        self._dead = True
        self._generation += 1  # what the dead process still sends reaches no one
        log.error("engine failed: %s", reason)
        restart = self._restart_allowed()
        message = "the engine stopped after an internal error"
        if restart:
            error: EngineUnavailable = EngineRestarting(message, self.config.retry_after_seconds)
        else:
            error = EngineUnavailable(message)
        for ticket in self._tickets.values():
            ticket.outbox.put_nowait(error)
        for future in self._calls.values():
            if not future.done():
                future.set_exception(error)
        self._calls.clear()
        for model_id, info in self._infos.items():
            if info.state is ModelState.READY:
                event = ModelInvalidated(model_id, reason)
                self.events.publish(Event(event, model_id=model_id))
        self.events.publish(Event(ErrorOccurred(reason, code="engine_dead")))
        self.events.publish(Event(RuntimeStatus("error", self._ready_models(), self._active)))
        process = started(self._process)
        if process.is_alive():  # wedged, even stopped: SIGKILL, nothing it does reaches anyone
            process.kill()
        if restart:
            self._begin_restart()
        else:
            self._gave_up = self._running and not self._draining
            self._stopped.set()
        self._state_change()

    def _restart_allowed(self) -> bool:
        """Not during a shutdown, and at most max_engine_restarts failures in a row: a row
        ends once a restarted engine has served for RECOVERED_SECONDS."""
        if not self._running or self._draining:
            return False
        if time.monotonic() - self._serving_since >= RECOVERED_SECONDS:
            self._failures = 0
        self._failures += 1
        return self._failures <= self.config.max_engine_restarts

    def _begin_restart(self) -> None:
        """The models ready at the first failure of a row are the ones a restart loads again;
        they are listed as loading until then."""
        if not self._restarting:
            self._restarting = True
            self._serving_since = float("inf")  # a row of failures goes on until one serves
            self._restoring = [i for i in self._infos.values() if i.state is ModelState.READY]
        for info in self._restoring:
            loading = replace(info, state=ModelState.LOADING, weight_bytes_loaded=0)
            self._infos[info.model_id] = loading
        self._restarter = asyncio.create_task(self._restart(), name="mlx-engine-restart")

    async def _restart(self) -> None:
        """After a back-off that doubles with each failure in a row, a new engine process with
        the dead one's models: the same ids and sources, in the same order."""
        delay = self.config.engine_restart_backoff_seconds * 2 ** (self._failures - 1)
        log.warning(
            "restarting the engine in %g s (restart %d of at most %d in a row)",
            delay,
            self._failures,
            self.config.max_engine_restarts,
        )
        await self._reap()
        await asyncio.sleep(delay)
        try:
            await self._spawn()
        except Exception:
            log.exception("the engine process could not be started again")
            self._gave_up = True
            self._stopped.set()
            self._state_change()
            return
        self._dead = False
        self._post(Observe(self._records(self._observer)))
        self._token_events = False
        self.sync_token_events()
        try:
            for info in list(self._restoring):
                await self._reload(info)
        except EngineUnavailable:
            return  # it failed again: _fail has taken over
        self._restarting = False
        self._serving_since = time.monotonic()
        log.warning("the engine restarted with %d model(s)", self._ready_models())
        self.events.publish(Event(RuntimeStatus("ready", self._ready_models(), self._active)))
        self._state_change()

    async def _reload(self, info: ModelInfo) -> None:
        """One of the dead engine's models, loaded again; one that no longer loads is dropped.
        The facade's tokenizer for it lives in this process and was kept."""
        try:
            reloaded, _ = await self._call(Load(info.source, info.model_id))
        except EngineUnavailable:
            raise
        except Exception as exc:
            log.error("model %s could not be loaded again: %s", info.model_id, exc)
            self._restoring.remove(info)
            self._infos.pop(info.model_id, None)
            self._prompts.remove_model(info.model_id)
            gone = ModelUnloaded(info.model_id, f"not loaded again after a restart: {exc}")
            self.events.publish(Event(gone, model_id=info.model_id))
            return
        if info.draft_model_id and info.draft_model_id in self._infos:
            try:
                reloaded = await self._call(
                    Pair(info.model_id, info.draft_model_id, info.draft_tokens)
                )
            except DraftIncompatible as exc:
                log.error("model %s could not be paired again: %s", info.model_id, exc)
        self._infos[info.model_id] = reloaded

    async def _reap(self) -> None:
        """Join the dead process (killed or exited) and its threads, and close its pipes."""
        process, outbox = started(self._process), self._outbox
        reader, writer = started(self._reader), started(self._writer)
        started(self._watchdog).cancel()
        outbox.put(None)
        await asyncio.to_thread(process.join, REAP_SECONDS)
        await asyncio.to_thread(writer.join)
        started(self._commands).close()
        await asyncio.to_thread(reader.join)
        started(self._results).close()

    async def _cancel_restart(self) -> None:
        restarter = self._restarter
        if restarter is not None and not restarter.done():
            restarter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await restarter

    # ---- plumbing --------------------------------------------------------------------

    def _check_accepting(self) -> None:
        if self._restarting and not self._draining:
            raise EngineRestarting(
                "the engine is restarting after an internal error", self.config.retry_after_seconds
            )
        if self._dead:
            raise EngineUnavailable("the engine has stopped after an internal error")
        if self._draining:
            raise ShuttingDown(self.config.retry_after_seconds)
        if not self._running:
            raise EngineUnavailable("the engine is not running")

    async def _call(self, command: Any) -> Any:
        """A command (protocol.py) run in the engine process; its result, or its error raised."""
        call_id = next(self._ids)
        future = self._calls[call_id] = started(self._loop).create_future()
        self._send(Call(call_id, command))
        try:
            return await future
        finally:
            self._calls.pop(call_id, None)

    def _post(self, command: Any) -> None:
        """A command run in the engine process, not awaited."""
        self._send(command)

    def _send(self, command: Any) -> None:
        if self._dead or self._writer is None:
            raise EngineUnavailable("the engine process is gone")
        self._outbox.put(command)

    def _write(self, commands: Connection, outbox: queue.SimpleQueue) -> None:
        """Writer thread: pickles and sends the commands, in order, until told to stop (None).
        A pipe that breaks means the process is gone, which the reader thread reports."""
        while (command := outbox.get()) is not None:
            try:
                commands.send(command)
            except (BrokenPipeError, ConnectionResetError, OSError):
                return
            del command

    # ---- the engine process's results (reader thread, then event loop) -----------------

    def _read(self, generation: int, results: Connection, process: SpawnProcess) -> None:
        """Reader thread: one hop to the loop per message; the pipe's end is the process's."""
        while True:
            try:
                message = results.recv()
            except (EOFError, OSError):
                break
            self._to_loop(self._receive, generation, message)
        process.join(1.0)  # here, not on the loop: its exit code, if it is exiting
        self._to_loop(self._process_ended, generation)

    def _to_loop(self, fn: Callable, *args) -> None:
        loop = started(self._loop)
        with contextlib.suppress(RuntimeError):  # the loop has closed: no one left to tell
            loop.call_soon_threadsafe(fn, *args)

    def _receive(self, generation: int, reply: Any) -> None:
        if generation != self._generation:  # from a process declared dead
            return
        if type(reply) is StepOutput:
            self._take_step(reply)
        elif isinstance(reply, LoadProgress):
            info = self._infos.get(reply.model_id)
            if info is not None and info.state is ModelState.LOADING:
                progress = replace(
                    info, weight_bytes=reply.total_bytes, weight_bytes_loaded=reply.read_bytes
                )
                self._infos[reply.model_id] = progress
        elif isinstance(reply, (Result, Failure)):
            future = self._calls.get(reply.call_id)
            if future is not None and not future.done():
                if isinstance(reply, Result):
                    future.set_result(reply.value)
                else:
                    future.set_exception(reply.error)
        elif isinstance(reply, Died):
            self._fail(reply.reason)
        elif isinstance(reply, Stopped):
            self._stopped.set()

    def _take_step(self, step: StepOutput) -> None:
        tickets = self._tickets
        for delivery in step.deliveries:
            if (ticket := tickets.get(delivery[0])) is not None:
                # (rid, text, token ids) is a chunk mid-stream; (rid, item) anything else.
                item = delivery[1] if len(delivery) == 2 else GenerationChunk(*delivery[1:])
                ticket.outbox.put_nowait(item)
        replay(self._observer, step.observations)
        events = step.events
        if self._draining or self._restarting:
            # The engine's "ready" would follow our "shutdown", or come before its models.
            events = [e for e in events if not isinstance(e.payload, RuntimeStatus)]
        self.events.publish_all(events)

    def _process_ended(self, generation: int) -> None:
        if generation != self._generation:  # declared dead already
            return
        if self._running:
            code = started(self._process).exitcode
            self._fail(f"the engine process exited unexpectedly (exit code {code})")
        else:
            self._stopped.set()


class EventStream:
    """An async iterator over one subscription; closing it unsubscribes."""

    def __init__(self, bus: EventBus, subscription: Subscription, engine: Engine):
        self._bus = bus
        self._engine = engine
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
        self._engine.sync_token_events()

    async def aclose(self) -> None:
        self.close()


class EngineRestarting(EngineUnavailable):
    """The engine process failed and a new one is starting: worth retrying after
    `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


async def start_process(process: SpawnProcess) -> None:
    """`process.start()` on a thread; a cancel waits for the start to finish, so that no
    process is left half started."""
    starting = asyncio.ensure_future(asyncio.to_thread(process.start))
    try:
        await asyncio.shield(starting)
    except asyncio.CancelledError:
        await starting
        raise


def started(part: T | None) -> T:
    """A part of the engine that `start` sets, for code that only runs once it has."""
    if part is None:
        raise EngineUnavailable("the engine is not running")
    return part


def run_engine_process(*args) -> None:
    """The engine process's main, imported there only: the facade never loads the worker (and
    MLX's model code) into the server's process."""
    from .worker import run_engine_process as main

    main(*args)


def merge_chunks(chunks: list[GenerationChunk]) -> GenerationChunk:
    """A reader that fell behind gets one message for everything it missed."""
    if len(chunks) == 1:
        return chunks[0]
    last = chunks[-1]
    return replace(
        last,
        text="".join(c.text for c in chunks),
        token_ids=tuple(t for c in chunks for t in c.token_ids),
        logprobs=tuple(entry for c in chunks for entry in c.logprobs),
        prompt_logprobs=tuple(entry for c in chunks for entry in c.prompt_logprobs),
    )


def total_usage(finished: list[GenerationChunk]) -> Usage:
    """The usage of several samples of one prompt together."""
    usages = [chunk.usage for chunk in finished if chunk.usage is not None]
    first, completion = usages[0], sum(u.completion_tokens for u in usages)
    total_time = max(u.total_time for u in usages)
    first_token = min(u.time_to_first_token for u in usages)
    decoding = total_time - first_token
    return Usage(
        prompt_tokens=first.prompt_tokens,
        completion_tokens=completion,
        cached_prompt_tokens=first.cached_prompt_tokens,
        queue_time=min(u.queue_time for u in usages),
        time_to_first_token=first_token,
        tokens_per_second=(completion - len(usages)) / decoding if decoding > 0 else 0.0,
        total_time=total_time,
        draft_tokens_proposed=sum(u.draft_tokens_proposed for u in usages),
        draft_tokens_accepted=sum(u.draft_tokens_accepted for u in usages),
    )


@contextlib.contextmanager
def environment(variables: dict[str, str], replacing: dict[str, str] | None = None):
    """Set, for a child process to inherit, `variables` not already set and every one of
    `replacing`; then put the environment back as it was."""
    replacing = replacing or {}
    added = {name: value for name, value in variables.items() if name not in os.environ}
    added.update(replacing)
    before = {name: os.environ.get(name) for name in added}
    os.environ.update(added)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
