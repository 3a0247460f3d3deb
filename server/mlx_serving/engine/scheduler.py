"""Every model's continuous batch, as plain code: admit, cancel, unload, and `step()`.

No process, pipe or pickling here: the engine process (worker.py) drives a Scheduler with the
facade's commands and sends what each `step()` returns; a test builds one in-process with a
model and steps it directly.
"""

import copy
import logging
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

from .admission import Admission
from .batch_cache import make_cache
from .capacity import Capacity, format_bytes, model_capacity
from .config import EngineConfig
from .constraints import ConstrainedRow, Constraints, MaskBatch
from .detokenizer import StreamingDetokenizer
from .distributed import Leader
from .errors import (
    DraftIncompatible,
    InvalidRequest,
    ModelNotFound,
    RequestAborted,
    SequenceFailed,
)
from .events import (
    ABORTED,
    Event,
    GenerationCompleted,
    GenerationStarted,
    ModelLoaded,
    ModelUnloaded,
    RuntimeStatus,
    TokenGenerated,
)
from .fused_batch import FusedRow, fused_eligible
from .loading import LoadedModel
from .logprobs import Pieces, RawLogprobs, prompt_logprobs, token_logprobs
from .models import ModelInfo
from .observer import EngineObserver, RecordingObserver
from .prefill import BucketedPromptBatch, PrefillPacer, buckets_wanted
from .protocol import END, StepOutput
from .requests import FinishReason, GenerationChunk, GenerationRequest, Usage
from .sampling import ban_until, make_logits_processors, make_sampler
from .speculative import (
    Draft,
    SpeculativeGenerationBatch,
    SpeculativeRow,
    check_pairing,
    speculative_row,
)
from .stopping import StopMatcher

log = logging.getLogger(__name__)

# Steps with fewer tokens than this render them on the engine thread: a hand-off to the
# rendering thread costs more than it saves.
RENDER_THREAD_ROWS = 4
# A model's batch steps failing this many times in a row, each with a fresh batch generator,
# is the engine's failure, not a request's: the engine stops.
MAX_STEP_FAILURES = 3
# With nothing to run but constraints being compiled, a step waits this long for one.
COMPILE_WAIT_SECONDS = 0.05


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
    # Tokens whose text is not shown (special tokens, unless the request wants them).
    hidden_ids: frozenset[int]
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
    # Constrained output: the matcher being compiled, then the sequence's hooks in the step.
    compiling: Future | None = None
    constrained: ConstrainedRow | None = None
    # With logprobs and logits processors: the model's own distribution of each step.
    raw_logprobs: RawLogprobs | None = None
    # perf_counter() time at which the request's time_limit ends it.
    deadline: float | None = None
    # Another sample of the prompt of `leader`, waiting to start from its prefill; the
    # leader's waiting samples.
    leader: "Sequence | None" = None
    forks: list["Sequence"] = field(default_factory=list)
    # Speculative decoding: the row's sampler, with its draft-token counts (speculative.py).
    speculation: SpeculativeRow | None = None

    @property
    def kv_tokens(self) -> int:
        """The most tokens its KV cache can hold: what it reserves of the KV budget."""
        return len(self.prompt) + self.max_tokens

    @property
    def blocked(self) -> bool:
        """Waiting for its matcher to compile or its leader's prefill."""
        return self.compiling is not None or self.leader is not None


@dataclass
class ModelSlot:
    """A loaded model with its batch generator and the sequences it runs."""

    loaded: LoadedModel
    capacity: Capacity
    generator: BatchGenerator
    # Constrained rows of the step in progress, whose masks are filled together.
    masks: MaskBatch
    # Each token's text, for logprobs.
    pieces: Pieces
    # In the generator, by its uid.
    sequences: dict[int, Sequence] = field(default_factory=dict)
    # Admitted, gathering company for one shared prefill (see `_release`), oldest first.
    waiting: list[Sequence] = field(default_factory=list)
    # The last step's tokens and when they came, handled during the next step (see `_step`).
    pending: tuple[list, float] | None = None
    # Batch steps failed in a row (see `_step_failed`).
    failures: int = 0
    # The tokenizer's special tokens, kept out of the text unless a request asks for them.
    special_ids: frozenset[int] = frozenset()
    # The draft model paired with this one (speculative decoding), if any.
    draft: Draft | None = None
    # How much each step prefills while sequences decode (prefill.PrefillPacer).
    pacer: PrefillPacer | None = None
    # KV tokens `sequences` reserve (see `admissible`), and the count last told the observer.
    kv_tokens: int = 0
    kv_reported: int = -1

    def __len__(self) -> int:
        return len(self.sequences) + len(self.waiting)

    def held(self) -> list[Sequence]:
        return [*self.sequences.values(), *self.waiting]


class Scheduler:
    """Every loaded model's batch generator and the sequences it runs."""

    def __init__(self, config: EngineConfig, stream: mx.Stream | None = None):
        self.config = config
        # Replaced by a RecordingObserver while the facade's observer records anything.
        self.observer = EngineObserver()
        # Every batch runs on this stream (MLX streams belong to the thread that made them).
        self.stream = stream or mx.new_stream(mx.default_device())
        self.slots: dict[str, ModelSlot] = {}
        self.sequences: dict[int, Sequence] = {}
        # Whether anyone subscribes to TokenGenerated: without, no per-token event is built.
        self.token_events = False
        # Rank 0 of a sharded group (distributed.py): mirrors every generator to the others.
        self.sharding: Leader | None = None
        self.prefix_cache = LRUPromptCache(
            max_size=config.prefix_cache_entries, max_bytes=config.prefix_cache_bytes
        )
        self._renderer = ThreadPoolExecutor(1, thread_name_prefix="mlx-engine-render")
        self._deliveries: list[tuple] = []
        self._events: list[Event] = []
        self._status = ""
        # Sequences whose sampler or logits processor raised during a step (see `guarded`).
        self._faults: list[tuple[Sequence, Exception]] = []
        self.constraints = Constraints()
        # Sequences with a time limit.
        self._timed: set[Sequence] = set()

    @property
    def idle(self) -> bool:
        """No model has a sequence running or waiting."""
        return not any(self.slots.values())

    def waiting(self) -> int:
        """Sequences admitted and not yet handed to a batch, over every model."""
        return sum(len(slot.waiting) for slot in self.slots.values())

    def publish(self, event: Event) -> None:
        """Sent with the step's other results (see `take_output`)."""
        self._events.append(event)

    def step(self) -> StepOutput | None:
        """One batch step of every model with work, then what it produced for the facade."""
        if self._timed:
            self._end_expired(time.perf_counter())
        self._wait_for_compiles()
        for slot in list(self.slots.values()):
            if slot:
                self._step_guarded(slot)
        self._report_status()
        return self.take_output()

    def _wait_for_compiles(self) -> None:
        """Rather than spin while every waiting sequence's constraint compiles."""
        if any(slot.sequences for slot in self.slots.values()):
            return
        compiling = [s.compiling for s in self.sequences.values() if s.compiling is not None]
        if compiling and len(compiling) == len(self.sequences):
            wait(compiling, timeout=COMPILE_WAIT_SECONDS, return_when=FIRST_COMPLETED)

    def take_output(self) -> StepOutput | None:
        """Every reader's chunks, the events and the observations since the last call."""
        observations = self.observer.take() if isinstance(self.observer, RecordingObserver) else []
        if not (self._deliveries or self._events or observations):
            return None
        deliveries, self._deliveries = self._deliveries, []
        events, self._events = self._events, []
        return StepOutput(deliveries, events, observations)

    def close(self) -> None:
        self._renderer.shutdown()
        self.constraints.close()

    def _report_status(self) -> None:
        active = sum(len(slot) for slot in self.slots.values())
        status = "busy" if active else "ready"
        if status != self._status:
            self._status = status
            self.publish(Event(RuntimeStatus(status, len(self.slots), active)))
        for model_id, slot in self.slots.items():
            if slot.kv_tokens != slot.kv_reported:
                slot.kv_reported = slot.kv_tokens
                capacity = slot.capacity
                reserved = slot.kv_tokens * capacity.kv_bytes_per_token
                self.observer.kv_cache(model_id, reserved, capacity.kv_budget)

    def add_model(self, loaded: LoadedModel, load_seconds: float = 0.0) -> None:
        """Serve `loaded` (from `loading.load_model`, or read a piece at a time by the worker)."""
        special_ids = frozenset(loaded.tokenizer.all_special_ids)
        capacity = self._capacity(loaded)
        slot = ModelSlot(
            loaded,
            capacity,
            self._generator(loaded, capacity.batch_size),
            MaskBatch(self.constraints.executor),
            Pieces(loaded.tokenizer),
            special_ids=special_ids,
        )
        if self.config.prefill_pacing > 0:
            slot.pacer = PrefillPacer(self.config.prefill_step_size, self.config.prefill_pacing)
        self.slots[loaded.info.model_id] = slot
        self.observer.models_loaded(len(self.slots))
        self.publish(loaded_event(loaded, load_seconds))

    def _deliver(self, sequence: Sequence, item: Any) -> None:
        """`item`: a final GenerationChunk, an error, or END (see `_advance` for the others)."""
        self._deliveries.append((sequence.rid, item))

    def _capacity(self, loaded: LoadedModel) -> Capacity:
        """The model's batch size and KV budget (configured or derived from memory now), told
        to the log and put on its info."""
        info = loaded.info
        with mx.stream(self.stream):
            capacity = model_capacity(loaded.model, info.context_length, self.config)
        log.info(
            "%s: %s of KV cache per token; KV budget %s (%s); batch size %d (%s, sized for "
            "%d-token sequences)",
            info.model_id,
            format_bytes(capacity.kv_bytes_per_token),
            format_bytes(capacity.kv_budget),
            "configured"
            if capacity.free_bytes is None
            else f"{self.config.kv_memory_fraction:g} of {format_bytes(capacity.free_bytes)} free",
            capacity.batch_size,
            "configured" if self.config.max_batch_size else "derived",
            capacity.context_tokens,
        )
        loaded.info = replace(
            info, max_batch_size=capacity.batch_size, max_kv_bytes=capacity.kv_budget
        )
        return capacity

    def _generator(self, loaded: LoadedModel, batch_size: int) -> BatchGenerator:
        generator = BatchGenerator(
            loaded.model,
            stop_tokens=[[t] for t in sorted(loaded.tokenizer.eos_token_ids)],
            completion_batch_size=batch_size,
            # mlx-lm decodes max(completion, prefill) sequences: keep the batch size a cap.
            prefill_batch_size=min(self.config.prefill_batch_size, batch_size),
            prefill_step_size=self.config.prefill_step_size,
            stream=self.stream,
        )
        # New rows join this batch (extend), so its step samples every fused row at once.
        generator._generation_batch = SpeculativeGenerationBatch.empty(
            loaded.model, generator.sampler
        )
        if buckets_wanted(self.config.prefill_buckets):  # shapes the worker compiled at load
            generator._prompt_batch = BucketedPromptBatch.empty(
                loaded.model, generator.sampler, prefill_step_size=self.config.prefill_step_size
            )
        if self.sharding is not None:
            self.sharding.lead(loaded.info.model_id, generator)
        return generator

    def unload(self, model_id: str) -> None:
        """End the model's sequences (RequestAborted) and free it."""
        if (slot := self.slots.pop(model_id, None)) is None:
            raise ModelNotFound(model_id)
        self._dissolve_pairs(model_id)
        for sequence in slot.held():
            self._end(slot, sequence, RequestAborted(f"model {model_id!r} was unloaded"))
        slot.generator.close()
        del slot
        self.constraints.forget_model(model_id)
        mx.clear_cache()
        self.observer.models_loaded(len(self.slots))
        self.observer.kv_cache(model_id, 0, 0)
        self.publish(Event(ModelUnloaded(model_id, reason="requested"), model_id=model_id))

    def pair(self, model_id: str, draft_id: str, draft_tokens: int) -> ModelInfo:
        """Make `draft_id` the draft model of `model_id` (speculative decoding); its info."""
        if self.sharding is not None:
            raise DraftIncompatible("sharded models do not speculate", model_id)
        slot, draft = self.slots.get(model_id), self.slots.get(draft_id)
        if slot is None:
            raise ModelNotFound(model_id)
        if draft is None:
            raise DraftIncompatible(f"draft model {draft_id!r} is not loaded", model_id)
        if draft_id == model_id or draft.draft is not None:
            raise DraftIncompatible(
                f"{draft_id!r} cannot draft for {model_id!r}: a model drafts for another, and a "
                "model with a draft of its own drafts for none",
                model_id,
            )
        check_pairing(slot.loaded, draft.loaded)
        self._dissolve_pairs(model_id)
        slot.draft = Draft(draft_id, draft.loaded.model, draft_tokens)
        info = slot.loaded.info = replace(
            slot.loaded.info, draft_model_id=draft_id, draft_tokens=draft_tokens
        )
        return info

    def _dissolve_pairs(self, model_id: str) -> None:
        """Unpair `model_id` from its draft and from the models it drafts for: their rows that
        speculate finish without speculation."""
        for slot in self.slots.values():
            draft = slot.draft
            if draft is not None and (
                draft.model_id == model_id or slot is self.slots.get(model_id)
            ):
                draft.active = False
                slot.draft = None
                slot.loaded.info = replace(slot.loaded.info, draft_model_id="", draft_tokens=0)

    def admit(
        self, admission: Admission, rid: int, internal: bool = False, fork_of: int | None = None
    ) -> None:
        """Queue a request the facade has checked; whatever goes wrong is told to its reader
        (the facade does not wait for an answer)."""
        if self.sharding is not None and (refusal := self.sharding.refusal(admission.request)):
            self._deliveries.append((rid, refusal))
            return
        try:
            self._admit(admission, rid, internal, fork_of)
        except Exception as exc:
            if isinstance(exc, KeyError):  # unloaded after the facade checked
                exc = ModelNotFound(admission.request.model_id)
            else:
                log.exception("admission failed (request id %s)", admission.request.request_id)
                exc = SequenceFailed(admission.request.request_id)
            self._deliveries.append((rid, exc))

    def _admit(self, admission: Admission, rid: int, internal: bool, fork_of: int | None) -> None:
        request, prompt = admission.request, admission.prompt
        slot = self.slots[request.model_id]
        leader = self.sequences.get(fork_of) if fork_of is not None else None
        if leader is not None and (leader.completion_tokens or len(prompt) < 2):
            leader = None
        tokenizer = slot.loaded.tokenizer
        # A constrained output ends when its structure is complete: by the EOS the
        # constraint then allows, whatever ignore_eos says.
        keep_eos = not request.ignore_eos or request.constraint is not None
        eos = frozenset(tokenizer.eos_token_ids if keep_eos else ())
        if self.sharding is not None:  # sharded: no prefix cache, no forks (distributed.py)
            leader = None
        # Warm-up requests neither use nor fill the prefix cache.
        if internal or leader is not None or self.sharding is not None:
            cache, cached = None, 0
        else:
            cache, cached = self._cached_prefix(request.model_id, prompt)
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
            hidden_ids=frozenset() if request.include_special_tokens else slot.special_ids,
            cached_tokens=cached,
        )
        stop_ids = sorted(eos | set(request.stop_token_ids))
        sampler: Callable | None
        if self.config.fused_sampler and fused_eligible(
            request.sampling, request.constraint is not None, request.min_tokens
        ):
            # Bias and penalties included: the batch's one fused call (fused_batch.py).
            sampler, processors = FusedRow(request.sampling, prompt), []
        else:
            sampler = make_sampler(request.sampling)
            processors = make_logits_processors(request.sampling)
        if request.min_tokens and stop_ids:
            processors.append(ban_until(stop_ids, request.min_tokens))
        if request.logprobs and processors:
            sequence.raw_logprobs = RawLogprobs()
            processors.insert(0, sequence.raw_logprobs)
        sequence.speculation = speculative_row(
            slot.draft,
            request.draft_tokens,
            request.sampling.greedy,
            sampler,
            processors,
            request.constraint is not None,
        )
        if sequence.speculation is not None:
            sampler = sequence.speculation
        if request.time_limit is not None:
            sequence.deadline = sequence.arrival + request.time_limit
            self._timed.add(sequence)
        sequence.generator_args = dict(
            prompts=list(prompt[cached:]),
            max_tokens=admission.max_tokens,
            caches=cache or make_cache(slot.loaded.model),
            all_tokens=list(prompt[:cached]),
            samplers=sampler
            if isinstance(sampler, (FusedRow, SpeculativeRow)) or sampler is None
            else guarded(sampler, sequence, self._faults, greedy),
            logits_processors=[guarded(p, sequence, self._faults, unchanged) for p in processors],
            stop_sequences=StopSequences([[t] for t in stop_ids] or None),
        )
        if request.constraint is not None:
            sequence.compiling = self.constraints.compile(
                request.model_id, tokenizer, request.constraint
            )
            sequence.generator_args["samplers"] = sampler or greedy
        if leader is not None:
            sequence.leader = leader
            leader.forks.append(sequence)
        slot.waiting.append(sequence)
        self.sequences[rid] = sequence
        if request.prompt_logprobs is not None:
            with mx.stream(self.stream):
                entries = prompt_logprobs(
                    slot.loaded.model,
                    prompt,
                    request.prompt_logprobs,
                    slot.pieces,
                    self.config.prefill_step_size,
                )
            self._deliver(sequence, GenerationChunk("", (), prompt_logprobs=entries))
        if not internal:
            self.observer.request_queued(request.model_id)
            self.publish(
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
                    client_request_id=request.client_request_id,
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
        if not cache or not tokens or self.sharding is not None:
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
        Only those that fit the model's KV budget join (see `admissible`).
        """
        if not slot.waiting:
            return
        waiting = [s for s in slot.waiting if not s.blocked or self._ready(slot, s)]
        if not waiting:
            return
        running = len(slot.sequences)
        company = min(self.config.prefill_batch_size, slot.capacity.batch_size - running)
        if (
            running
            and len(waiting) < company
            and now - waiting[0].arrival < self.config.prefill_gather_seconds
        ):
            return
        waiting = admissible(slot, waiting)
        if not waiting:
            return
        joining = set(waiting)
        slot.waiting = [s for s in slot.waiting if s.blocked or s not in joining]
        args = [sequence.generator_args for sequence in waiting]
        uids = slot.generator.insert(
            **{key: [a[key] for a in args] for key in args[0]},
        )
        for uid, sequence in zip(uids, waiting, strict=True):
            sequence.uid, sequence.generator_args = uid, {}
            slot.sequences[uid] = sequence
            slot.kv_tokens += sequence.kv_tokens

    def _ready(self, slot: ModelSlot, sequence: Sequence) -> bool:
        return sequence.leader is None and self._constrain(slot, sequence)

    def _constrain(self, slot: ModelSlot, sequence: Sequence) -> bool:
        """Whether a constrained sequence can join the batch: its matcher is compiled (and
        hooked into its sampling), or the compile failed (and the sequence ended)."""
        compiling = sequence.compiling
        if compiling is None:
            return True
        if not compiling.done():
            return False
        sequence.compiling = None
        try:
            matcher, vocab = compiling.result()
        except Exception as exc:
            self._end(slot, sequence, exc)
            return False
        args = sequence.generator_args
        request = sequence.request
        row = ConstrainedRow(
            matcher,
            slot.masks,
            args["samplers"],
            vocab,
            banned_tokens=request.min_tokens > 0,
            field=request.constraint.kind if request.constraint else "constraint",
        )
        sequence.constrained = row
        args["samplers"] = guarded(row.sample, sequence, self._faults, greedy)
        return True

    def _end_expired(self, now: float) -> None:
        """End the sequences whose time limit passed, with what they made so far."""
        for sequence in [s for s in self._timed if s.deadline is not None and s.deadline <= now]:
            slot = self.slots.get(sequence.request.model_id)
            if slot is None or self.sequences.get(sequence.rid) is not sequence:
                self._timed.discard(sequence)
                continue
            if slot.sequences.get(sequence.uid) is sequence:
                slot.generator.remove([sequence.uid])
            text = sequence.detokenizer.finalize()
            if sequence.stop_matcher is not None:
                text, _ = sequence.stop_matcher.feed(text)
                text += sequence.stop_matcher.flush()
            usage = make_usage(sequence, now)
            self._deliver(sequence, GenerationChunk(text, (), FinishReason.TIME_LIMIT, usage))
            self._end(slot, sequence, END, FinishReason.TIME_LIMIT, usage)

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
            # Emptied in place: every sequence's `guarded` closures hold this very list.
            faults = self._faults.copy()
            self._faults.clear()
        for sequence, exc in faults:
            if self.sequences.get(sequence.rid) is sequence:
                self._fail_sequence(slot, sequence, exc)

    def _fail_sequence(self, slot: ModelSlot, sequence: Sequence, exc: Exception) -> None:
        """End a sequence whose own code raised: the caller's error as it is (a constraint
        that cannot be followed), anything else as the engine's (logged, INTERNAL)."""
        request_id = sequence.request.request_id
        if slot.sequences.get(sequence.uid) is sequence:
            slot.generator.remove([sequence.uid])
        if isinstance(exc, InvalidRequest):
            self._end(slot, sequence, exc)
            return
        log.error("a sequence failed (request id %s)", request_id, exc_info=exc)
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
        slot.generator = self._generator(slot.loaded, slot.capacity.batch_size)
        slot.pending = None
        slot.masks.active.clear()

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
        slot.masks.next_step()
        prompt_tokens = self._pace_prefill(slot)
        prompt_responses, responses = slot.generator.next()
        stepped_at = time.perf_counter()
        if slot.pacer is not None:
            prompt_tokens = slot.generator._counters.prompt_tokens - prompt_tokens
            slot.pacer.observe(
                stepped_at - started, bool(responses), prompt_tokens, bool(prompt_responses)
            )
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
            # Backwards: a sequence's tokens of one step (several when it speculates) go
            # together, with its last if that one is at the edge.
            edge: set[int] = set()
            for sequence, response in reversed(rows):
                if sequence.rid in edge or at_edge(sequence, response):
                    edge.add(sequence.rid)
                    now_rows.append((sequence, response))
                else:
                    later.append(response)
            now_rows.reverse()
            later.reverse()
            rows = now_rows
            slot.pending = (later, stepped_at) if later else None
        if rows:
            self._emit(slot, rows, render_rows(slot.loaded.tokenizer, rows), stepped_at)

    def _pace_prefill(self, slot: ModelSlot) -> int:
        """Set this step's prefill chunk (see PrefillPacer); the prompt tokens so far."""
        generator = slot.generator
        if slot.pacer is None:
            return 0
        prefilling = len(generator._prompt_batch) + len(generator._unprocessed_sequences)
        rows = min(prefilling, generator.prefill_batch_size)
        waiting = [row[0] for row in generator._currently_processing]
        waiting += [row[1] for row in list(generator._unprocessed_sequences)[:rows]]
        longest = max((len(segments[0]) for segments in waiting if segments), default=0)
        chunk = slot.pacer.chunk(len(generator._generation_batch), rows, longest)
        generator.prefill_step_size = generator._prompt_batch.prefill_step_size = chunk
        return generator._counters.prompt_tokens

    def _emit(self, slot: ModelSlot, rows: list, rendered: list, now: float) -> None:
        logprobs = self._logprobs(slot, rows)
        for (sequence, response), token in zip(rows, rendered, strict=True):
            if sequence.rid not in self.sequences:
                continue  # ended by an earlier token of this step (speculation: a stop)
            if isinstance(token, Exception):
                self._fail_sequence(slot, sequence, token)
            else:
                self._advance(slot, sequence, response, now, token, logprobs.get(id(response)))

    def _logprobs(self, slot: ModelSlot, rows: list) -> dict:
        """The logprobs of the rows that asked for them, computed together."""
        wanted = [(s, r) for s, r in rows if s.request.logprobs]
        if not wanted:
            return {}
        distributions = [s.raw_logprobs.take() if s.raw_logprobs else r.logprobs for s, r in wanted]
        entries = token_logprobs(
            distributions,
            [r.token for _, r in wanted],
            [s.request.top_logprobs for s, _ in wanted],
            slot.pieces,
        )
        return {id(r): entry for (_, r), entry in zip(wanted, entries, strict=True)}

    def _advance(
        self,
        slot: ModelSlot,
        sequence: Sequence,
        response: Any,
        now: float,
        rendered: tuple,
        logprobs: Any = None,
    ) -> None:
        """One new token of one sequence, already rendered: account, emit, maybe finish."""
        sequence.completion_tokens += 1
        model_id = sequence.request.model_id
        if sequence.completion_tokens == 1:
            if sequence.forks:
                self._start_forks(slot, sequence)
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
        entries = (logprobs,) if logprobs is not None and ids else ()
        if finish is None:
            if entries:
                self._deliver(sequence, GenerationChunk(text, ids, logprobs=entries))
            else:
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
        self._deliver(sequence, GenerationChunk(text, ids, finish, usage, matched, entries))
        self._end(slot, sequence, END, finish, usage)

    def _start_forks(self, slot: ModelSlot, leader: Sequence) -> None:
        """The leader's prefill is done: its other samples start from a copy of its KV cache
        (all but the prompt's last token, which each computes to draw its first token)."""
        forks, leader.forks = leader.forks, []
        keep = len(leader.prompt) - 1
        extracted = slot.generator.extract_cache([leader.uid]).get(leader.uid)
        for fork in forks:
            fork.leader = None
            if extracted is None or extracted[0][0].offset < keep:
                continue  # not in the batch after all: the fork prefills on its own
            cache = copy.deepcopy(extracted[0])
            excess = cache[0].offset - keep
            if excess and not (can_trim_prompt_cache(cache) and trim_prompt_cache(cache, excess)):
                continue
            fork.cached_tokens = keep
            fork.generator_args.update(
                prompts=list(fork.prompt[keep:]), caches=cache, all_tokens=list(fork.prompt[:keep])
            )

    def _publish_token(self, sequence: Sequence, response: Any, text: str, last: bool) -> None:
        """Only runs while someone subscribes to TokenGenerated: it costs a device sync."""
        request = sequence.request
        logprob = response.logprobs[response.token].item()
        self.publish(
            Event(
                TokenGenerated(
                    request.model_id, text, response.token, logprob, False, request.metadata
                ),
                model_id=request.model_id,
                request_id=request.request_id,
                client_request_id=request.client_request_id,
            )
        )
        if last:
            end = TokenGenerated(
                request.model_id, "", end_of_sequence=True, metadata=request.metadata
            )
            self.publish(
                Event(
                    end,
                    model_id=request.model_id,
                    request_id=request.request_id,
                    client_request_id=request.client_request_id,
                )
            )

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
            slot.kv_tokens -= sequence.kv_tokens
        elif sequence in slot.waiting:
            slot.waiting.remove(sequence)
        self.sequences.pop(sequence.rid, None)
        self._timed.discard(sequence)
        if sequence.constrained is not None:
            slot.masks.discard(sequence.constrained)
        for fork in sequence.forks:  # never started from this one's prefill: prefill alone
            fork.leader = None
        sequence.forks = []
        usage = usage or make_usage(sequence, time.perf_counter())
        if isinstance(final, RequestAborted):
            # As the contract says: a last message with the reason and the usage so far, then
            # the error status (UNAVAILABLE), so callers know to retry elsewhere.
            self._deliver(sequence, GenerationChunk("", (), FinishReason.CANCELLED, usage))
        if final is not None:
            self._deliver(sequence, final)
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
        if usage.draft_tokens_proposed:
            self.observer.draft_tokens(
                sequence.request.model_id, usage.draft_tokens_proposed, usage.draft_tokens_accepted
            )
        self.publish(
            Event(
                GenerationCompleted(
                    model=sequence.request.model_id,
                    tokens_generated=sequence.completion_tokens,
                    duration_seconds=usage.total_time,
                    throughput=usage.tokens_per_second,
                    finish_reason=reason,
                    metadata=sequence.request.metadata,
                    draft_tokens_proposed=usage.draft_tokens_proposed,
                    draft_tokens_accepted=usage.draft_tokens_accepted,
                ),
                model_id=sequence.request.model_id,
                request_id=sequence.request.request_id,
                client_request_id=sequence.request.client_request_id,
            )
        )

    def abort_all(self, error: Exception) -> None:
        for slot in self.slots.values():
            slot.generator.remove(list(slot.sequences))
            for sequence in slot.held():
                self._end(slot, sequence, error)


def admissible(slot: ModelSlot, waiting: list[Sequence]) -> list[Sequence]:
    """The oldest of `waiting` whose KV caches fit the model's budget beside the sequences
    in the batch; the rest wait (they are not refused) until running ones finish.

    Each sequence reserves its prompt plus max_tokens, the most it can hold, so a batch never
    outgrows its budget as it decodes (batch padding is not counted: the memory kept out of
    the budget covers it). First come, first served: a sequence that does not fit holds back
    those behind it, so short prompts do not starve a long one. With nothing running, the
    oldest joins whatever its size, and runs alone: a request larger than the budget is slow,
    not refused.
    """
    budget, per_token = slot.capacity.kv_budget, slot.capacity.kv_bytes_per_token
    reserved = sum(s.kv_tokens for s in slot.sequences.values()) * per_token
    joining: list[Sequence] = []
    for sequence in waiting:
        need = sequence.kv_tokens * per_token
        if (slot.sequences or joining) and reserved + need > budget:
            break
        joining.append(sequence)
        reserved += need
    return joining


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
    ids: tuple[int, ...]
    if stopped_by_token and not (matched and sequence.request.include_stop):
        text, ids = "", ()
    elif response.token in sequence.hidden_ids:
        text, ids = "", (response.token,)
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
        if sequence.constrained is not None and sequence.constrained.incomplete(response.token):
            return FinishReason.STRUCTURE_INCOMPLETE
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
        draft_tokens_proposed=sequence.speculation.proposed if sequence.speculation else 0,
        draft_tokens_accepted=sequence.speculation.accepted if sequence.speculation else 0,
    )


def loaded_event(loaded: LoadedModel, seconds: float) -> Event:
    info = loaded.info
    quantization = info.quantization
    details = {
        "dtype": info.dtype,
        "architecture": info.architecture,
        "load_seconds": f"{seconds:.3f}",
        "max_batch_size": str(info.max_batch_size),
        "max_kv_bytes": str(info.max_kv_bytes),
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
