"""The engine process: the one owner of every MLX object (models, KV caches, batches).

The Engine facade (engine.py) starts this module's `run_engine_process` in a process of its
own, so that the Python work of the wire layer never competes with the decode loop for a GIL:
on a GPU a small model's batch step is bound by the host, and every microsecond the event loop
holds the GIL was a microsecond of decoding lost. Commands arrive as `(call id, function,
args)` over one pipe; results go back over another, once per step for every request's chunks,
every event and every observer call together.
"""

import contextlib
import importlib.metadata
import logging
import pickle
import signal
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

from .admission import Admission
from .batch_cache import make_cache
from .config import EngineConfig
from .detokenizer import StreamingDetokenizer
from .errors import (
    ModelLoadFailed,
    ModelNotFound,
    ModelSourceNotFound,
    RequestAborted,
    SequenceFailed,
)
from .events import (
    Event,
    GenerationCompleted,
    GenerationStarted,
    ModelLoaded,
    ModelUnloaded,
    RuntimeStatus,
    TokenGenerated,
)
from .loading import (
    LoadedModel,
    build_model,
    describe_model,
    read_tokenizer,
    resolve_model_path,
    shorten,
    weight_bytes,
    weight_chunks,
)
from .models import ModelSource
from .observer import EngineObserver, RecordingObserver
from .requests import FinishReason, GenerationChunk, GenerationRequest, Usage
from .sampling import make_logits_processors, make_sampler
from .stopping import StopMatcher

log = logging.getLogger(__name__)

# Sent to a request's reader to end it.
END = "end"

# Steps with fewer tokens than this render them on the engine thread: a hand-off to the
# rendering thread costs more than it saves.
RENDER_THREAD_ROWS = 4
# The finish reason events and metrics give a sequence the engine ended (unload, shutdown).
ABORTED = "aborted"
# A loading model's weights are read this many bytes per loop turn, between batch steps.
LOAD_CHUNK_BYTES = 64 << 20
# How long an otherwise idle engine waits for a command at a time while a load waits on its
# thread (finding the model, reading its tokenizer).
LOADING_POLL_SECONDS = 0.005
# Returned by a command whose caller is answered later (see `_run_command`).
DEFERRED = object()
# How often an idle engine wakes to show the facade's watchdog it is alive.
HEARTBEAT_SECONDS = 0.5
# A model's batch steps failing this many times in a row, each with a fresh batch generator,
# is the engine's failure, not a request's: the engine stops.
MAX_STEP_FAILURES = 3


@dataclass(eq=False)
class Sequence:
    """Engine-process state of one request, known to the facade by its `rid`."""

    request: GenerationRequest
    prompt: tuple[int, ...]
    max_tokens: int
    context_clipped: bool
    rid: int
    internal: bool
    detokenizer: StreamingDetokenizer
    stop_matcher: StopMatcher | None
    eos: frozenset[int]
    # What the batch generator is given when the sequence joins it (see `_release`).
    generator_args: dict = field(default_factory=dict)
    cached_tokens: int = 0
    arrival: float = field(default_factory=time.perf_counter)
    started: bool = False
    start_time: float = 0.0
    first_token_time: float = 0.0
    last_token_time: float = 0.0
    completion_tokens: int = 0
    uid: int = -1


@dataclass
class Loading:
    """A model being loaded without holding up the batches of the models already loaded: its
    directory is found (or downloaded) and its tokenizer read on a thread, and its weights
    are read a chunk per loop turn, between batch steps."""

    call_id: int
    model_id: str
    source: ModelSource
    started: float
    # The thread's job in hand: the model's directory, then its tokenizer.
    job: Future
    path: Path | None = None
    model: Any = None
    config: dict = field(default_factory=dict)
    chunks: list = field(default_factory=list)
    total_bytes: int = 0
    read_bytes: int = 0


@dataclass
class ModelSlot:
    """A loaded model with its batch generator and the sequences it runs."""

    loaded: LoadedModel
    generator: BatchGenerator
    # In the generator, by its uid.
    sequences: dict[int, Sequence] = field(default_factory=dict)
    # Admitted, gathering company for one shared prefill (see `_release`), oldest first.
    waiting: list[Sequence] = field(default_factory=list)
    # The last step's tokens and when they came, handled during the next step (see `_step`).
    pending: tuple[list, float] | None = None
    # Batch steps failed in a row (see `_step_failed`).
    failures: int = 0

    def __len__(self) -> int:
        return len(self.sequences) + len(self.waiting)

    def held(self) -> list[Sequence]:
        return [*self.sequences.values(), *self.waiting]


class Scheduler:
    """The engine process's loop: take commands, step every model's batch, send the results."""

    def __init__(
        self, config: EngineConfig, commands: Connection, results: Connection, heartbeat: Any
    ):
        self.config = config
        # Replaced by a RecordingObserver while the facade's observer records anything.
        self.observer = EngineObserver()
        self._commands = commands
        self._results = results
        # When the loop last showed progress (time.monotonic, shared memory): the facade's
        # watchdog reads it.
        self._heartbeat = heartbeat
        self.slots: dict[str, ModelSlot] = {}
        self.sequences: dict[int, Sequence] = {}
        # Whether anyone subscribes to TokenGenerated: without, no per-token event is built.
        self.token_events = False
        self.prefix_cache = LRUPromptCache(
            max_size=config.prefix_cache_entries, max_bytes=config.prefix_cache_bytes
        )
        self.running = True
        self.loading: list[Loading] = []
        self.load_chunk_bytes = LOAD_CHUNK_BYTES
        self._call_id: int | None = None
        self._deliveries: list[tuple[int, Any]] = []
        self._events_out: list[Event] = []
        self._status = ""
        # Sequences whose sampler or logits processor raised during a step (see `guarded`).
        self._faults: list[tuple[Sequence, Exception]] = []

    def _publish(self, event: Event) -> None:
        """Sent to the facade with the step's other results (see `deliver`)."""
        self._events_out.append(event)

    def run(self) -> None:
        self._stream = mx.new_stream(mx.default_device())
        self._renderer = ThreadPoolExecutor(1, thread_name_prefix="mlx-engine-render")
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="mlx-engine-loader")
        try:
            with mx.stream(self._stream):
                while self.running:
                    self._take_commands()
                    for slot in list(self.slots.values()):
                        if slot:
                            self._beat()
                            self._step_guarded(slot)
                    if self.loading:
                        self._continue_loading()
                    self._report_status()
                    self.deliver()
        except BaseException as exc:
            log.exception("engine loop died")
            self.deliver()  # what was already decided, such as events of admitted requests
            self._reply("failed", f"engine loop died: {type(exc).__name__}")
        finally:
            for loading in self.loading:
                stopped = ModelLoadFailed(f"the engine stopped before {loading.model_id!r} loaded")
                self._send_result(loading.call_id, False, stopped)
            self._renderer.shutdown()
            self._loader.shutdown(wait=False, cancel_futures=True)
            self._reply("stopped")

    def _reply(self, *message: Any) -> None:
        self._send_payload(pickle.dumps(message))

    def _send_payload(self, payload: bytes) -> None:
        """To the facade; once it has gone (it closed the pipe) there is no one left to tell."""
        try:
            self._results.send_bytes(payload)
        except (BrokenPipeError, ConnectionResetError, EOFError):
            self.running = False

    def stop(self) -> None:
        self.running = False

    def _report_status(self) -> None:
        active = sum(len(slot) for slot in self.slots.values())
        status = "busy" if active else "ready"
        if status != self._status:
            self._status = status
            self._publish(Event(RuntimeStatus(status, len(self.slots), active)))

    def _beat(self) -> None:
        self._heartbeat.value = time.monotonic()

    def _take_commands(self) -> None:
        self._beat()
        if not any(self.slots.values()):
            # Idle, unless loading: then look at the pipe between pieces of the load.
            if self._commands.poll(self._idle_wait()):
                self._run_command(self._commands.recv())
                # Idle → busy: give concurrent arrivals a moment to join the first step.
                time.sleep(self.config.coalesce_seconds)
        while self.running and self._commands.poll():
            self._beat()
            self._run_command(self._commands.recv())

    def _idle_wait(self) -> float:
        """How long an idle loop may wait for a command: until its next heartbeat, unless a
        model is loading; a moment if that load waits on its thread; not at all if it has
        weights to read."""
        if not self.loading:
            return min(HEARTBEAT_SECONDS, self.config.wedge_timeout_seconds / 4)
        head = self.loading[0]
        waiting = head.path is None or (not head.chunks and not head.job.done())
        return LOADING_POLL_SECONDS if waiting else 0.0

    def _run_command(self, command: tuple[int | None, Callable, tuple]) -> None:
        """`fn(self, *args)`; a caller that waits (a call id) gets the result or the error."""
        call_id, fn, args = command
        self._call_id = call_id
        try:
            ok, value = True, fn(self, *args)
        except Exception as exc:
            # Without its traceback: exc → traceback → this frame → exc is a cycle that keeps
            # the command's arguments alive until the garbage collector's next full pass.
            ok, value = False, exc.with_traceback(None)
        if call_id is None:
            if not ok:
                log.error("engine command %s failed", getattr(fn, "__name__", fn), exc_info=value)
            return
        if ok and value is DEFERRED:
            return
        self._send_result(call_id, ok, value)

    def _send_result(self, call_id: int, ok: bool, value: Any) -> None:
        self.deliver()  # the command's events reach the facade before its result
        try:
            payload = pickle.dumps(("result", call_id, ok, value))
        except Exception as exc:  # a result or third-party error that cannot cross processes
            error = RuntimeError(f"{type(value).__name__}: {value}" if not ok else repr(exc))
            payload = pickle.dumps(("result", call_id, False, error))
        self._send_payload(payload)

    def _send(self, sequence: Sequence, item: Any) -> None:
        """`item`: a final GenerationChunk, an error, or END (see `_advance` for the others)."""
        self._deliveries.append((sequence.rid, item))

    def deliver(self) -> None:
        """One message to the facade per step: every reader's chunks, events, observations."""
        observations = self.observer.take() if isinstance(self.observer, RecordingObserver) else []
        if self._deliveries or self._events_out or observations:
            deliveries, self._deliveries = self._deliveries, []
            events, self._events_out = self._events_out, []
            self._reply("step", deliveries, events, observations)

    def load(self, source: ModelSource, model_id: str) -> Any:
        """Start loading; the caller is answered `(info, path)` once the model is ready."""
        job = self._loader.submit(resolve_model_path, source)
        self.loading.append(Loading(self._call_id, model_id, source, time.perf_counter(), job))
        return DEFERRED

    def _continue_loading(self) -> None:
        """One short piece of the oldest load: build the (lazy) model once its directory is
        found, read one chunk of its weights, or finish once its tokenizer is read."""
        loading = self.loading[0]
        try:
            if loading.path is None:
                if not loading.job.done():
                    return
                loading.path = loading.job.result()
                loading.model, loading.config = build_model(
                    loading.path,
                    fuse=self.config.fuse_projections,
                    decode_kernel=self.config.decode_attention_kernel,
                )
                loading.chunks = weight_chunks(loading.model, self.load_chunk_bytes)
                loading.total_bytes = weight_bytes(loading.model)
                loading.job = self._loader.submit(read_tokenizer, loading.path, loading.config)
                self._reply("loading", loading.model_id, 0, loading.total_bytes)
            elif loading.chunks:
                chunk = loading.chunks.pop(0)
                mx.eval(chunk)
                loading.read_bytes += sum(w.nbytes for w in chunk)
                self._reply("loading", loading.model_id, loading.read_bytes, loading.total_bytes)
            elif loading.job.done():
                self._finish_loading(loading, loading.job.result())
        except Exception as exc:
            if self.loading and self.loading[0] is loading:
                self.loading.pop(0)
            if not isinstance(exc, (ModelLoadFailed, ModelSourceNotFound)):
                exc = ModelLoadFailed(
                    f"cannot load {describe_source(loading)}: {type(exc).__name__}: {exc}"
                )
            self._send_result(loading.call_id, False, exc.with_traceback(None))
            mx.clear_cache()

    def _finish_loading(self, loading: Loading, tokenizer) -> None:
        loaded = LoadedModel(
            model=loading.model,
            tokenizer=tokenizer,
            info=describe_model(
                loading.model_id, loading.source, loading.model, tokenizer, loading.config
            ),
            path=loading.path,
        )
        self.loading.pop(0)
        self.slots[loading.model_id] = ModelSlot(loaded=loaded, generator=self._generator(loaded))
        self.observer.models_loaded(len(self.slots))
        self._publish(loaded_event(loaded, time.perf_counter() - loading.started))
        self._send_result(loading.call_id, True, (loaded.info, str(loaded.path)))

    def _generator(self, loaded: LoadedModel) -> BatchGenerator:
        return BatchGenerator(
            loaded.model,
            stop_tokens=[[t] for t in sorted(loaded.tokenizer.eos_token_ids)],
            completion_batch_size=self.config.max_batch_size,
            prefill_batch_size=self.config.prefill_batch_size,
            prefill_step_size=self.config.prefill_step_size,
            stream=self._stream,
        )

    def unload(self, model_id: str) -> None:
        slot = self.slots.pop(model_id)
        for sequence in slot.held():
            self._end(slot, sequence, RequestAborted(f"model {model_id!r} was unloaded"))
        slot.generator.close()
        del slot
        mx.clear_cache()
        self.observer.models_loaded(len(self.slots))
        self._publish(Event(ModelUnloaded(model_id, reason="requested"), model_id=model_id))

    def admit(self, admission: Admission, rid: int, internal: bool) -> None:
        """Queue a request the facade has checked; whatever goes wrong is told to its reader
        (the facade does not wait for an answer)."""
        try:
            self._admit(admission, rid, internal)
        except Exception as exc:
            if isinstance(exc, KeyError):  # unloaded after the facade checked
                exc = ModelNotFound(admission.request.model_id)
            else:
                log.exception("admission failed (request id %s)", admission.request.request_id)
                exc = SequenceFailed(admission.request.request_id)
            self._deliveries.append((rid, exc))

    def _admit(self, admission: Admission, rid: int, internal: bool) -> None:
        request, prompt = admission.request, admission.prompt
        slot = self.slots[request.model_id]
        tokenizer = slot.loaded.tokenizer
        eos = frozenset(() if request.ignore_eos else tokenizer.eos_token_ids)
        # Warm-up requests neither use nor fill the prefix cache.
        cache, cached = (None, 0) if internal else self._cached_prefix(request.model_id, prompt)
        sequence = Sequence(
            request=request,
            prompt=prompt,
            max_tokens=admission.max_tokens,
            context_clipped=admission.context_clipped,
            rid=rid,
            internal=internal,
            detokenizer=StreamingDetokenizer(tokenizer),
            stop_matcher=StopMatcher(request.stop, request.include_stop) if request.stop else None,
            eos=eos,
            cached_tokens=cached,
        )
        stop_ids = sorted(eos | set(request.stop_token_ids))
        sampler = make_sampler(request.sampling)
        processors = make_logits_processors(request.sampling)
        sequence.generator_args = dict(
            prompts=list(prompt[cached:]),
            max_tokens=admission.max_tokens,
            caches=cache or make_cache(slot.loaded.model),
            all_tokens=list(prompt[:cached]),
            samplers=sampler and guarded(sampler, sequence, self._faults, greedy),
            logits_processors=[guarded(p, sequence, self._faults, unchanged) for p in processors],
            stop_sequences=StopSequences([[t] for t in stop_ids] or None),
        )
        slot.waiting.append(sequence)
        self.sequences[rid] = sequence
        if not internal:
            self.observer.request_queued(request.model_id)
            self._publish(
                Event(
                    GenerationStarted(
                        model=request.model_id,
                        text=request.text,
                        messages=request.messages,
                        add_generation_prompt=request.add_generation_prompt,
                        token_ids=request.token_ids,
                        max_tokens=admission.max_tokens,
                        metadata=request.metadata,
                    ),
                    model_id=request.model_id,
                    request_id=request.request_id,
                )
            )

    def _cached_prefix(self, model_id: str, prompt: tuple[int, ...]) -> tuple[list | None, int]:
        """The KV cache of the longest cached prefix, leaving at least one token to compute."""
        cache, rest = self.prefix_cache.fetch_nearest_cache(model_id, list(prompt))
        self.observer.prefix_cache_lookup(cache is not None)
        if cache is None:
            return None, 0
        if not rest:
            if not can_trim_prompt_cache(cache):
                return None, 0
            trim_prompt_cache(cache, 1)
            rest = prompt[-1:]
        return cache, len(prompt) - len(rest)

    def _remember_prefix(self, model_id: str, tokens: list[int], cache: list | None) -> None:
        """Keep a finished sequence's KV cache, in a byte budget that counts the running batch."""
        if not cache or not tokens:
            return
        self.prefix_cache.insert_cache(model_id, list(tokens), cache)
        running = sum(slot.generator.prompt_cache_nbytes for slot in self.slots.values())
        self.prefix_cache.trim_to(n_bytes=self.config.prefix_cache_bytes - running)
        self.observer.prefix_cache_size(self.prefix_cache.nbytes)

    def _release(self, slot: ModelSlot, now: float) -> None:
        """Hand waiting sequences to the generator together, so they share one prefill.

        A busy batch's finished sequences are replaced by requests that arrive a network round
        trip apart; inserted one by one, each would cost a prefill pass and a join of its own
        (host-bound work that stalls every running sequence). So arrivals wait for company:
        until a full prefill batch (or every free slot) is waiting, or the oldest has waited
        `prefill_gather_seconds`. An idle model starts at once (its arrivals were coalesced).
        """
        waiting = slot.waiting
        if not waiting:
            return
        running = len(slot.sequences)
        company = min(self.config.prefill_batch_size, self.config.max_batch_size - running)
        if (
            running
            and len(waiting) < company
            and now - waiting[0].arrival < self.config.prefill_gather_seconds
        ):
            return
        slot.waiting = []
        args = [sequence.generator_args for sequence in waiting]
        uids = slot.generator.insert(
            **{key: [a[key] for a in args] for key in args[0]},
        )
        for uid, sequence in zip(uids, waiting, strict=True):
            sequence.uid, sequence.generator_args = uid, {}
            slot.sequences[uid] = sequence

    def _step_guarded(self, slot: ModelSlot) -> None:
        """A batch step; a sequence whose sampling raised ends alone, and a step that raised
        ends only its own model's batch (see `_step_failed`)."""
        try:
            self._step(slot)
        except Exception:
            self._step_failed(slot)
        else:
            slot.failures = 0
        finally:
            faults, self._faults[:] = list(self._faults), []
        for sequence, exc in faults:
            if self.sequences.get(sequence.rid) is sequence:
                self._fail_sequence(slot, sequence, exc)

    def _fail_sequence(self, slot: ModelSlot, sequence: Sequence, exc: Exception) -> None:
        request_id = sequence.request.request_id
        log.error("a sequence failed (request id %s)", request_id, exc_info=exc)
        if slot.sequences.get(sequence.uid) is sequence:
            slot.generator.remove([sequence.uid])
        self._end(slot, sequence, SequenceFailed(request_id))

    def _step_failed(self, slot: ModelSlot) -> None:
        """A step raised outside any one sequence's code: end the sequences it ran, with an
        error their callers see, and give the model a fresh batch generator. Failing again and
        again, with fresh generators, is the engine's own failure: raise, and the engine stops."""
        slot.failures += 1
        model_id = slot.loaded.info.model_id
        if slot.failures >= MAX_STEP_FAILURES:
            raise
        log.exception("a batch step of %s failed; its sequences end", model_id)
        for sequence in [s for s in self.sequences.values() if s.request.model_id == model_id]:
            if sequence not in slot.waiting:
                self._end(slot, sequence, SequenceFailed(sequence.request.request_id))
        slot.generator.close()
        slot.generator, slot.pending = self._generator(slot.loaded), None

    def _step(self, slot: ModelSlot) -> None:
        """Launch the next batch step, and meanwhile turn the previous step's tokens into text.

        The step is bound by the host: building and launching its graph. mlx-lm's `next()`
        releases the GIL while MLX launches the step and waits for the one before, so a busy
        step's detokenizing and stop matching run then, on the rendering thread, during the
        following step instead of after their own. Such tokens reach readers one step later,
        and a sequence that a stop string ends computes one token more, which nobody sees. A
        step of fewer than RENDER_THREAD_ROWS tokens is rendered at once, as the hand-off would
        cost more than it saves; so are a sequence's first token (its client's time to first
        token) and the last of one mlx-lm ended (length, stop token), whose reader may be
        waiting to send its next request into the freed slot.
        """
        started = time.perf_counter()
        self._release(slot, started)
        rendering = None
        if slot.pending is not None:
            (held, came_at), slot.pending = slot.pending, None
            if held_rows := live_rows(slot, held):
                rendering = self._renderer.submit(render_rows, slot.loaded.tokenizer, held_rows)
        prompt_responses, responses = slot.generator.next()
        stepped_at = time.perf_counter()
        if responses or prompt_responses:
            self.observer.step(slot.loaded.info.model_id, len(responses), stepped_at - started)
        for response in prompt_responses:
            sequence = slot.sequences.get(response.uid)
            if sequence is not None and not sequence.started:
                self._mark_started(sequence, stepped_at)
        if rendering is not None:
            self._emit(slot, held_rows, rendering.result(), came_at)
        rows = live_rows(slot, responses)
        if len(responses) >= RENDER_THREAD_ROWS:
            now_rows, later = [], []
            for sequence, response in rows:
                if at_edge(sequence, response):
                    now_rows.append((sequence, response))
                else:
                    later.append(response)
            rows = now_rows
            slot.pending = (later, stepped_at) if later else None
        if rows:
            self._emit(slot, rows, render_rows(slot.loaded.tokenizer, rows), stepped_at)

    def _emit(self, slot: ModelSlot, rows: list, rendered: list, now: float) -> None:
        for (sequence, response), token in zip(rows, rendered, strict=True):
            if isinstance(token, Exception):
                self._fail_sequence(slot, sequence, token)
            else:
                self._advance(slot, sequence, response, now, token)

    def _advance(
        self, slot: ModelSlot, sequence: Sequence, response: Any, now: float, rendered: tuple
    ) -> None:
        """One new token of one sequence, already rendered: account, emit, maybe finish."""
        sequence.completion_tokens += 1
        model_id = sequence.request.model_id
        if sequence.completion_tokens == 1:
            if not sequence.started:
                self._mark_started(sequence, now)
            sequence.first_token_time = now
            if not sequence.internal:
                self.observer.first_token(model_id, now - sequence.arrival)
        elif not sequence.internal:
            self.observer.tokens(model_id, 1, now - sequence.last_token_time)
        sequence.last_token_time = now
        text, ids, finish, matched = rendered
        if self.token_events and not sequence.internal:
            self._publish_token(sequence, response, text, finish is not None)
        if finish is None:
            # A bare tuple: pickling a dataclass per token would cost the decode loop ~2 µs.
            self._deliveries.append((sequence.rid, text, ids))
            return
        if response.finish_reason is None:
            removed = slot.generator.remove([sequence.uid], return_prompt_caches=True)
            cache, tokens = removed.get(sequence.uid, (None, None))
        else:
            cache, tokens = response.prompt_cache, response.all_tokens
        if not sequence.internal:
            self._remember_prefix(sequence.request.model_id, tokens, cache)
        usage = make_usage(sequence, now)
        self._send(sequence, GenerationChunk(text, ids, finish, usage, matched))
        self._end(slot, sequence, END, finish, usage)

    def _publish_token(self, sequence: Sequence, response: Any, text: str, last: bool) -> None:
        """Only runs while someone subscribes to TokenGenerated: it costs a device sync."""
        request = sequence.request
        logprob = response.logprobs[response.token].item()
        self._publish(
            Event(
                TokenGenerated(
                    request.model_id, text, response.token, logprob, False, request.metadata
                ),
                model_id=request.model_id,
                request_id=request.request_id,
            )
        )
        if last:
            end = TokenGenerated(
                request.model_id, "", end_of_sequence=True, metadata=request.metadata
            )
            self._publish(Event(end, model_id=request.model_id, request_id=request.request_id))

    def _mark_started(self, sequence: Sequence, now: float) -> None:
        sequence.started, sequence.start_time = True, now
        if not sequence.internal:
            self.observer.request_started(sequence.request.model_id, now - sequence.arrival)

    def set_token_events(self, wanted: bool) -> None:
        self.token_events = wanted

    def set_observing(self, observing: bool) -> None:
        self.observer = RecordingObserver() if observing else EngineObserver()

    def cancel(self, rid: int) -> None:
        sequence = self.sequences.get(rid)
        if sequence is None:
            return
        slot = self.slots.get(sequence.request.model_id)
        if slot is None:
            return
        if slot.sequences.get(sequence.uid) is sequence:
            slot.generator.remove([sequence.uid])
            self._end(slot, sequence, None, FinishReason.CANCELLED)
        elif sequence in slot.waiting:
            self._end(slot, sequence, None, FinishReason.CANCELLED)

    def _end(
        self,
        slot: ModelSlot,
        sequence: Sequence,
        final: Any,
        finish: FinishReason = FinishReason.CANCELLED,
        usage: Usage | None = None,
    ) -> None:
        """Forget a sequence and tell its reader (unless it already left).

        `final` an error: the engine ended the sequence (unload, shutdown), which events and
        metrics report as ABORTED rather than as the reader's cancellation.
        """
        if slot.sequences.get(sequence.uid) is sequence:
            del slot.sequences[sequence.uid]
        elif sequence in slot.waiting:
            slot.waiting.remove(sequence)
        self.sequences.pop(sequence.rid, None)
        usage = usage or make_usage(sequence, time.perf_counter())
        if isinstance(final, RequestAborted):
            # As the contract says: a last message with the reason and the usage so far, then
            # the error status (UNAVAILABLE), so callers know to retry elsewhere.
            self._send(sequence, GenerationChunk("", (), FinishReason.CANCELLED, usage))
        if final is not None:
            self._send(sequence, final)
        if sequence.internal:
            return
        reason = ABORTED if isinstance(final, Exception) else finish.value
        self.observer.request_finished(
            sequence.request.model_id,
            reason,
            usage.prompt_tokens,
            usage.cached_prompt_tokens,
            usage.completion_tokens,
            usage.total_time,
            sequence.started,
        )
        self._publish(
            Event(
                GenerationCompleted(
                    model=sequence.request.model_id,
                    tokens_generated=sequence.completion_tokens,
                    duration_seconds=usage.total_time,
                    throughput=usage.tokens_per_second,
                    finish_reason=reason,
                    metadata=sequence.request.metadata,
                ),
                model_id=sequence.request.model_id,
                request_id=sequence.request.request_id,
            )
        )

    def abort_all(self, error: Exception) -> None:
        for slot in self.slots.values():
            slot.generator.remove(list(slot.sequences))
            for sequence in slot.held():
                self._end(slot, sequence, error)


def live_rows(slot: ModelSlot, responses: list) -> list[tuple[Sequence, Any]]:
    """Each response paired with its sequence, if that sequence still runs."""
    rows = []
    for response in responses:
        sequence = slot.sequences.get(response.uid)
        if sequence is not None:
            rows.append((sequence, response))
    return rows


def at_edge(sequence: Sequence, response: Any) -> bool:
    """A sequence's first token, or the last of one mlx-lm ended: never held back a step."""
    return response.finish_reason is not None or sequence.completion_tokens == 0


def render_rows(tokenizer, rows: list[tuple[Sequence, Any]]) -> list[tuple | Exception]:
    """`render` of every row, or the error it raised (that row's sequence fails alone); runs
    on the rendering thread while the engine thread steps."""
    rendered: list[tuple | Exception] = []
    for sequence, response in rows:
        try:
            rendered.append(render(tokenizer, sequence, response))
        except Exception as exc:
            rendered.append(exc)
    return rendered


def guarded(fn: Callable, sequence: Sequence, faults: list, fallback: Callable) -> Callable:
    """`fn` (a sampler or logits processor of one sequence) such that an error it raises while
    the step's graph is built is noted in `faults` and `fallback` stands in, so the rest of the
    batch steps on; the scheduler then ends that sequence alone."""

    def call(*args):
        try:
            return fn(*args)
        except Exception as exc:
            faults.append((sequence, exc))
            return fallback(*args)

    return call


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def unchanged(tokens: mx.array, logits: mx.array) -> mx.array:
    return logits


def render(tokenizer, sequence: Sequence, response: Any) -> tuple:
    """A new token as its reader sees it: (text, token ids, finish reason, matched stop).

    Touches only the sequence's detokenizer and stop matcher, which nothing else uses while a
    step is in flight.
    """
    finish, matched = finish_reason(response, sequence), ""
    stopped_by_token = response.finish_reason == "stop"
    if stopped_by_token and finish is FinishReason.STOP_SEQUENCE:
        matched = tokenizer.decode([response.token])
    if stopped_by_token and not (matched and sequence.request.include_stop):
        text, ids = "", ()
    else:
        text, ids = sequence.detokenizer.add_token(response.token), (response.token,)
    if finish is not None:
        text += sequence.detokenizer.finalize()
    if sequence.stop_matcher is not None:
        text, stop = sequence.stop_matcher.feed(text)
        if stop is not None:
            finish, matched = FinishReason.STOP_SEQUENCE, stop
        elif finish is not None:
            text += sequence.stop_matcher.flush()
    return text, ids, finish, matched


def finish_reason(response: Any, sequence: Sequence) -> FinishReason | None:
    """Why mlx-lm's batch generator ended a sequence, in our terms."""
    reason = response.finish_reason
    if reason == "stop":
        if response.token in sequence.eos:
            return FinishReason.END_OF_SEQUENCE
        return FinishReason.STOP_SEQUENCE
    if reason == "length":
        return FinishReason.CONTEXT_LENGTH if sequence.context_clipped else FinishReason.MAX_TOKENS
    return None


def make_usage(sequence: Sequence, now: float) -> Usage:
    decoding = now - sequence.first_token_time
    n = sequence.completion_tokens
    return Usage(
        prompt_tokens=len(sequence.prompt),
        completion_tokens=n,
        cached_prompt_tokens=sequence.cached_tokens,
        queue_time=(sequence.start_time - sequence.arrival)
        if sequence.started
        else now - sequence.arrival,
        time_to_first_token=(sequence.first_token_time - sequence.arrival) if n else 0.0,
        tokens_per_second=(n - 1) / decoding if n > 1 and decoding > 0 else 0.0,
        total_time=now - sequence.arrival,
    )


def loaded_event(loaded: LoadedModel, seconds: float) -> Event:
    info = loaded.info
    quantization = info.quantization
    details = {
        "dtype": info.dtype,
        "architecture": info.architecture,
        "load_seconds": f"{seconds:.3f}",
    }
    return Event(
        ModelLoaded(
            model=info.model_id,
            model_path=str(loaded.path),
            quantization=(
                f"{quantization.bits}-bit {quantization.mode}, group {quantization.group_size}"
                if quantization
                else ""
            ),
            parameters=info.parameter_count,
            metadata=tuple(details.items()),
        ),
        model_id=info.model_id,
    )


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def describe_source(loading: Loading) -> str:
    """The source a load was given, short enough for a message (a path may be 4 KiB)."""
    return repr(shorten(str(loading.path or loading.source.local_path or loading.source.repo_id)))


def run_engine_process(
    config: EngineConfig, commands: Connection, results: Connection, heartbeat: Any, log_level: int
) -> None:
    """The engine process's main: log as the server does, then run until told to stop.

    Signals are the server's to handle: a Ctrl-C or a SIGTERM sent to the whole process group
    must start a graceful shutdown, not kill the engine under the streams it should finish. The
    engine still ends with the server: its command pipe closes when the server exits.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    log.info("MLX %s on %s", mx.__version__, mx.default_device())
    if conflict := backend_conflict(installed_mlx_backends()):
        log.warning(conflict)
    Scheduler(config, commands, results, heartbeat).run()


MLX_BACKENDS = ("mlx-cpu", "mlx-cuda-12", "mlx-cuda-13", "mlx-metal")


def installed_mlx_backends() -> list[str]:
    backends = []
    for name in MLX_BACKENDS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            importlib.metadata.distribution(name)
            backends.append(name)
    return backends


def backend_conflict(backends: list[str]) -> str | None:
    """MLX's backend packages all ship mlx/lib/libmlx.so: with two installed, the one installed
    last runs, whichever that was, and removing either breaks the other."""
    if len(backends) < 2:
        return None
    keep = next((name for name in backends if name.startswith("mlx-cuda")), backends[-1])
    others = " ".join(name for name in backends if name != keep)
    return (
        f"MLX backends {', '.join(backends)} are installed side by side and overwrite each "
        f"other's library; keep one: pip uninstall -y {others} {keep} && "
        f"pip install {keep}=={mx.__version__}"
    )
