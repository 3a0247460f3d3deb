"""The engine thread: the one owner of every MLX object (models, KV caches, batches).

MLX streams are thread-local, so the models, mlx-lm's BatchGenerator per model and the prefix
cache are only touched here. The Engine facade (engine.py) hands this thread commands through a
queue; the thread sends results back with `loop.call_soon_threadsafe`, once per step for all
requests and events together.
"""

import asyncio
import contextlib
import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

from .config import EngineConfig
from .detokenizer import StreamingDetokenizer
from .errors import FieldViolation, InvalidRequest, RequestAborted
from .events import (
    Event,
    EventBus,
    GenerationCompleted,
    GenerationStarted,
    ModelLoaded,
    ModelUnloaded,
    RuntimeStatus,
    TokenGenerated,
)
from .loading import LoadedModel, load_model
from .models import ModelInfo, ModelSource
from .observer import EngineObserver
from .requests import FinishReason, GenerationChunk, GenerationRequest, Usage
from .sampling import make_logits_processors, make_sampler
from .stopping import StopMatcher

log = logging.getLogger(__name__)

# Sent down a request's queue to end it.
END = object()


@dataclass(eq=False)
class Ticket:
    """The reader's side of a request; the engine thread attaches the sequence it admits."""

    outbox: asyncio.Queue
    internal: bool
    sequence: "Sequence | None" = None
    finished: bool = False


@dataclass
class Sequence:
    """Engine-thread state of one request."""

    request: GenerationRequest
    prompt: list[int]
    max_tokens: int
    context_clipped: bool
    ticket: Ticket
    detokenizer: StreamingDetokenizer
    stop_matcher: StopMatcher | None
    eos: frozenset[int]
    cached_tokens: int = 0
    arrival: float = field(default_factory=time.perf_counter)
    started: bool = False
    start_time: float = 0.0
    first_token_time: float = 0.0
    last_token_time: float = 0.0
    completion_tokens: int = 0
    uid: int = -1


@dataclass
class ModelSlot:
    """A loaded model with its batch generator and the sequences it runs."""

    loaded: LoadedModel
    generator: BatchGenerator
    sequences: dict[int, Sequence] = field(default_factory=dict)


class Scheduler:
    """Runs on the engine thread only, but for `receive`, which the event loop runs."""

    def __init__(
        self,
        config: EngineConfig,
        observer: EngineObserver,
        events: EventBus,
        commands: "queue.SimpleQueue[Callable[[], None]]",
        loop: asyncio.AbstractEventLoop,
        on_failure: Callable[[str], None],
        on_stopped: Callable[[], None],
    ):
        self.config = config
        self.observer = observer
        self.events = events
        self._commands = commands
        self._loop = loop
        self._on_failure = on_failure
        self._on_stopped = on_stopped
        self.slots: dict[str, ModelSlot] = {}
        self.prefix_cache = LRUPromptCache(
            max_size=config.prefix_cache_entries, max_bytes=config.prefix_cache_bytes
        )
        self.running = True
        # When the current batch step began; None between steps. The watchdog reads it.
        self.stepping_since: float | None = None
        self._deliveries: list[tuple[asyncio.Queue, Any]] = []
        self._events_out: list[Event] = []
        self._status = ""

    def _publish(self, event: Event) -> None:
        """Engine thread: sent to the loop with the step's other results (see `_deliver`)."""
        self._events_out.append(event)

    def run(self) -> None:
        self._stream = mx.new_stream(mx.default_device())
        try:
            with mx.stream(self._stream):
                while self.running:
                    self._take_commands()
                    self.stepping_since = time.monotonic()
                    for slot in list(self.slots.values()):
                        if slot.sequences:
                            self._step(slot)
                    self.stepping_since = None
                    self._report_status()
                    self.deliver()
        except BaseException as exc:
            log.exception("engine thread died")
            self.deliver()  # what was already decided, such as events of admitted requests
            self.to_loop(self._on_failure, f"engine thread died: {type(exc).__name__}")
        finally:
            self.to_loop(self._on_stopped)

    def to_loop(self, fn: Callable, *args) -> None:
        """Engine thread → event loop; a loop already closed has no one left to tell."""
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn, *args)

    def _report_status(self) -> None:
        active = sum(len(slot.sequences) for slot in self.slots.values())
        status = "busy" if active else "ready"
        if status != self._status:
            self._status = status
            self._publish(Event(RuntimeStatus(status, len(self.slots), active)))

    def _take_commands(self) -> None:
        busy = any(slot.sequences for slot in self.slots.values())
        if not busy:
            self._commands.get()()
            # Idle → busy: give concurrent arrivals a moment to join the first step.
            time.sleep(self.config.coalesce_seconds)
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    def _send(self, sequence: Sequence, item: Any) -> None:
        self._deliveries.append((sequence.ticket.outbox, item))

    def deliver(self) -> None:
        """One hop to the event loop per step, for every reader's chunks and every event."""
        if self._deliveries or self._events_out:
            deliveries, self._deliveries = self._deliveries, []
            events, self._events_out = self._events_out, []
            self.to_loop(self.receive, deliveries, events)

    def receive(self, deliveries: list[tuple[asyncio.Queue, Any]], events: list[Event]) -> None:
        """Event loop side of `deliver`."""
        for outbox, item in deliveries:
            outbox.put_nowait(item)
        self.events.publish_all(events)

    def load(self, source: ModelSource, model_id: str) -> ModelInfo:
        started = time.perf_counter()
        loaded = load_model(source, model_id)
        eos = sorted(loaded.tokenizer.eos_token_ids)
        generator = BatchGenerator(
            loaded.model,
            stop_tokens=[[t] for t in eos],
            completion_batch_size=self.config.max_batch_size,
            prefill_batch_size=self.config.prefill_batch_size,
            prefill_step_size=self.config.prefill_step_size,
            stream=self._stream,
        )
        self.slots[model_id] = ModelSlot(loaded=loaded, generator=generator)
        self.observer.models_loaded(len(self.slots))
        self._publish(loaded_event(loaded, time.perf_counter() - started))
        return loaded.info

    def unload(self, model_id: str) -> None:
        slot = self.slots.pop(model_id)
        for sequence in list(slot.sequences.values()):
            self._end(slot, sequence, RequestAborted(f"model {model_id!r} was unloaded"))
        slot.generator.close()
        del slot
        mx.clear_cache()
        self.observer.models_loaded(len(self.slots))
        self._publish(Event(ModelUnloaded(model_id, reason="requested"), model_id=model_id))

    def admit(self, request: GenerationRequest, ticket: Ticket) -> None:
        slot = self.slots[request.model_id]
        tokenizer, info = slot.loaded.tokenizer, slot.loaded.info
        prompt, field_name = encode_prompt(tokenizer, request)
        check_request_tokens(request, prompt, info.vocab_size)
        max_tokens, clipped = request.max_tokens, False
        if info.context_length:
            room = info.context_length - len(prompt)
            if room <= 0:
                raise InvalidRequest(
                    FieldViolation(
                        field_name,
                        f"the prompt has {len(prompt)} tokens; the model's context is "
                        f"{info.context_length}",
                    )
                )
            max_tokens, clipped = min(max_tokens, room), room < max_tokens
        eos = frozenset(() if request.ignore_eos else tokenizer.eos_token_ids)
        # Warm-up requests neither use nor fill the prefix cache.
        cache, cached = (
            (None, 0) if ticket.internal else self._cached_prefix(request.model_id, prompt)
        )
        sequence = Sequence(
            request=request,
            prompt=prompt,
            max_tokens=max_tokens,
            context_clipped=clipped,
            ticket=ticket,
            detokenizer=StreamingDetokenizer(tokenizer),
            stop_matcher=StopMatcher(request.stop, request.include_stop) if request.stop else None,
            eos=eos,
            cached_tokens=cached,
        )
        stop_ids = sorted(eos | set(request.stop_token_ids))
        (sequence.uid,) = slot.generator.insert(
            [prompt[cached:]],
            max_tokens=[max_tokens],
            caches=[cache],
            all_tokens=[prompt[:cached]],
            samplers=[make_sampler(request.sampling)],
            logits_processors=[make_logits_processors(request.sampling)],
            stop_sequences=[StopSequences([[t] for t in stop_ids] or None)],
        )
        slot.sequences[sequence.uid] = sequence
        ticket.sequence = sequence
        if not ticket.internal:
            self.observer.request_queued(request.model_id)
            self._publish(
                Event(
                    GenerationStarted(
                        model=request.model_id,
                        text=request.text,
                        messages=request.messages,
                        add_generation_prompt=request.add_generation_prompt,
                        token_ids=request.token_ids,
                        max_tokens=max_tokens,
                        metadata=request.metadata,
                    ),
                    model_id=request.model_id,
                    request_id=request.request_id,
                )
            )

    def _cached_prefix(self, model_id: str, prompt: list[int]) -> tuple[list | None, int]:
        """The KV cache of the longest cached prefix, leaving at least one token to compute."""
        cache, rest = self.prefix_cache.fetch_nearest_cache(model_id, prompt)
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

    def _step(self, slot: ModelSlot) -> None:
        started = time.perf_counter()
        prompt_responses, responses = slot.generator.next()
        now = time.perf_counter()
        model_id = slot.loaded.info.model_id
        self.observer.step(model_id, len(responses), now - started)
        for response in prompt_responses:
            sequence = slot.sequences.get(response.uid)
            if sequence is not None and not sequence.started:
                self._mark_started(sequence, now)
        for response in responses:
            sequence = slot.sequences.get(response.uid)
            if sequence is not None:
                self._advance(slot, sequence, response, now)

    def _advance(self, slot: ModelSlot, sequence: Sequence, response: Any, now: float) -> None:
        """One new token of one sequence: detokenize, match stops, emit, maybe finish."""
        sequence.completion_tokens += 1
        model_id = sequence.request.model_id
        if sequence.completion_tokens == 1:
            if not sequence.started:
                self._mark_started(sequence, now)
            sequence.first_token_time = now
            if not sequence.ticket.internal:
                self.observer.first_token(model_id, now - sequence.arrival)
        elif not sequence.ticket.internal:
            self.observer.tokens(model_id, 1, now - sequence.last_token_time)
        sequence.last_token_time = now
        finish, matched = finish_reason(response, sequence), ""
        stopped_by_token = response.finish_reason == "stop"
        if stopped_by_token and finish is FinishReason.STOP_SEQUENCE:
            matched = slot.loaded.tokenizer.decode([response.token])
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
        if self.events.token_subscribers and not sequence.ticket.internal:
            self._publish_token(sequence, response, text, finish is not None)
        if finish is None:
            self._send(sequence, GenerationChunk(text=text, token_ids=ids))
            return
        if response.finish_reason is None:
            removed = slot.generator.remove([sequence.uid], return_prompt_caches=True)
            cache, tokens = removed.get(sequence.uid, (None, None))
        else:
            cache, tokens = response.prompt_cache, response.all_tokens
        if not sequence.ticket.internal:
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
        if not sequence.ticket.internal:
            self.observer.request_started(sequence.request.model_id, now - sequence.arrival)

    def cancel(self, ticket: Ticket) -> None:
        sequence = ticket.sequence
        if sequence is None:
            return
        slot = self.slots.get(sequence.request.model_id)
        if slot is not None and slot.sequences.get(sequence.uid) is sequence:
            slot.generator.remove([sequence.uid])
            self._end(slot, sequence, None, FinishReason.CANCELLED)

    def _end(
        self,
        slot: ModelSlot,
        sequence: Sequence,
        final: Any,
        finish: FinishReason = FinishReason.CANCELLED,
        usage: Usage | None = None,
    ) -> None:
        """Forget a sequence and tell its reader (unless it already left)."""
        del slot.sequences[sequence.uid]
        if final is not None:
            self._send(sequence, final)
        if sequence.ticket.internal:
            return
        usage = usage or make_usage(sequence, time.perf_counter())
        self.observer.request_finished(
            sequence.request.model_id,
            finish.value,
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
                    finish_reason=finish.value,
                    metadata=sequence.request.metadata,
                ),
                model_id=sequence.request.model_id,
                request_id=sequence.request.request_id,
            )
        )

    def abort_all(self, error: Exception) -> None:
        for slot in self.slots.values():
            for sequence in list(slot.sequences.values()):
                slot.generator.remove([sequence.uid])
                self._end(slot, sequence, error)


def encode_prompt(tokenizer, request: GenerationRequest) -> tuple[list[int], str]:
    """Token ids of the prompt, and the request field to blame if they do not fit."""
    if request.token_ids is not None:
        return list(request.token_ids), "tokens.ids"
    if request.messages is not None:
        if tokenizer.chat_template is None:
            raise InvalidRequest(FieldViolation("chat", "the model has no chat template"))
        text = tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in request.messages],
            tokenize=False,
            add_generation_prompt=request.add_generation_prompt,
        )
        return tokenizer.encode(text, add_special_tokens=False), "chat.messages"
    # As mlx_lm.generate does: add BOS unless the text already starts with it.
    bos = tokenizer.bos_token
    add_special = bos is None or not request.text.startswith(bos)
    return tokenizer.encode(request.text, add_special_tokens=add_special), "text"


def check_request_tokens(request: GenerationRequest, prompt: list[int], vocab_size: int) -> None:
    """Every token id the caller gave must exist in the model's vocabulary."""
    bad = token_id_violations(list(request.stop_token_ids), vocab_size, "stop_token_ids[{}]")
    if request.token_ids is not None:
        bad = token_id_violations(prompt, vocab_size, "tokens.ids[{}]") + bad
    bias_ids = [t for t, _ in request.sampling.logit_bias]
    bad += token_id_violations(bias_ids, vocab_size, "logit_bias[{id}]")
    if bad:
        raise InvalidRequest(*bad[:16])


def check_token_ids(ids: list[int], vocab_size: int, field_name: str) -> None:
    if bad := token_id_violations(ids, vocab_size, field_name + "[{}]"):
        raise InvalidRequest(*bad[:16])


def token_id_violations(ids: list[int], vocab_size: int, field: str) -> list[FieldViolation]:
    """`field` is formatted with the index (positional) and the id (`id`)."""
    return [
        FieldViolation(
            field.format(i, id=t), f"token id {t} is not below the vocabulary size {vocab_size}"
        )
        for i, t in enumerate(ids)
        if t >= vocab_size
    ]


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
