"""The scheduler alone, in this process: admit, step, cancel, with the tiny model and no pipe."""

import pytest

from mlx_serving.engine import scheduler as scheduler_module
from mlx_serving.engine.admission import admit
from mlx_serving.engine.errors import ModelNotFound, RequestAborted, SequenceFailed
from mlx_serving.engine.protocol import END
from mlx_serving.engine.requests import FinishReason, GenerationChunk, GenerationRequest
from mlx_serving.engine.requests import SamplingParams as Sampling
from mlx_serving.engine.scheduler import Scheduler

MODEL_ID = "tiny"
GREEDY = Sampling(temperature=0)


def admission(loaded, text: str, max_tokens: int = 8, **fields):
    request = GenerationRequest(
        MODEL_ID,
        text=text,
        max_tokens=max_tokens,
        sampling=fields.pop("sampling", GREEDY),
        **fields,
    )
    prompt = loaded.tokenizer.encode(text)
    return admit(loaded.info, request, prompt, loaded.info.context_length)


class Streams:
    """What each request's reader would have received, by rid."""

    def __init__(self):
        self.chunks: dict[int, list[GenerationChunk]] = {}
        self.ends: dict[int, object] = {}

    def take(self, output) -> None:
        for delivery in output.deliveries if output else ():
            rid, item = delivery[0], delivery[1] if len(delivery) == 2 else None
            if item is None:
                item = GenerationChunk(*delivery[1:])
            if isinstance(item, GenerationChunk):
                self.chunks.setdefault(rid, []).append(item)
            else:
                self.ends[rid] = item

    def text(self, rid: int) -> str:
        return "".join(chunk.text for chunk in self.chunks.get(rid, []))

    def last(self, rid: int) -> GenerationChunk:
        return self.chunks[rid][-1]


def run(scheduler: Scheduler, streams: Streams, rids, steps: int = 500) -> None:
    for _ in range(steps):
        if all(rid in streams.ends for rid in rids):
            return
        streams.take(scheduler.step())
    raise AssertionError(f"not finished: {set(rids) - set(streams.ends)}")


def test_a_request_runs_to_max_tokens_and_ends(scheduler, loaded):
    streams = Streams()
    scheduler.admit(admission(loaded, "Hello world", 6, ignore_eos=True), rid=1)
    run(scheduler, streams, [1])
    assert streams.ends[1] == END
    assert streams.last(1).finish_reason is FinishReason.MAX_TOKENS
    assert sum(len(c.token_ids) for c in streams.chunks[1]) == 6
    assert not scheduler.sequences and scheduler.idle


def test_a_late_arrival_joins_the_running_batch(scheduler, loaded):
    streams = Streams()
    scheduler.admit(admission(loaded, "Once upon a time", 30, ignore_eos=True), rid=1)
    for _ in range(5):
        streams.take(scheduler.step())
    scheduler.admit(admission(loaded, "1 2 3", 5, ignore_eos=True), rid=2)
    run(scheduler, streams, [2])
    assert 1 not in streams.ends  # still running when the arrival finished
    run(scheduler, streams, [1])
    assert streams.last(2).finish_reason is streams.last(1).finish_reason is FinishReason.MAX_TOKENS
    alone = Streams()
    scheduler.admit(admission(loaded, "1 2 3", 5, ignore_eos=True), rid=3)
    run(scheduler, alone, [3])
    assert alone.text(3) == streams.text(2)  # joining a batch changes nothing (greedy)


def test_a_cancelled_sequence_leaves_and_the_other_goes_on(scheduler, loaded):
    streams = Streams()
    scheduler.admit(admission(loaded, "abc", 40, ignore_eos=True), rid=1)
    scheduler.admit(admission(loaded, "xyz", 12, ignore_eos=True), rid=2)
    for _ in range(4):
        streams.take(scheduler.step())
    scheduler.cancel(1)
    received = len(streams.chunks.get(1, []))
    run(scheduler, streams, [2])
    assert len(streams.chunks.get(1, [])) == received and 1 not in streams.ends
    assert 1 not in scheduler.sequences
    assert streams.last(2).finish_reason is FinishReason.MAX_TOKENS


def test_a_repeated_prompt_reuses_the_cached_prefix(scheduler, loaded):
    streams = Streams()
    prompt = "The quick brown fox jumps over the lazy dog. " * 3
    scheduler.admit(admission(loaded, prompt, 4), rid=1)
    run(scheduler, streams, [1])
    assert streams.last(1).usage.cached_prompt_tokens == 0
    scheduler.admit(admission(loaded, prompt, 4), rid=2)
    run(scheduler, streams, [2])
    usage = streams.last(2).usage
    assert usage.cached_prompt_tokens == usage.prompt_tokens - 1
    assert streams.text(2) == streams.text(1)


def test_a_stop_string_ends_the_sequence_before_it(scheduler, loaded):
    streams = Streams()
    scheduler.admit(admission(loaded, "Hello world", 24, ignore_eos=True), rid=1)
    run(scheduler, streams, [1])
    full = streams.text(1)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    scheduler.admit(admission(loaded, "Hello world", 24, ignore_eos=True, stop=(stop,)), rid=2)
    run(scheduler, streams, [2])
    assert streams.text(2) == full[: full.index(stop)]
    last = streams.last(2)
    assert last.finish_reason is FinishReason.STOP_SEQUENCE and last.matched_stop == stop


def test_a_sampler_that_raises_fails_its_sequence_alone(scheduler, loaded, monkeypatch):
    original = scheduler_module.make_sampler

    def make_sampler(params):
        if params.seed != 666:
            return original(params)

        def sample(logprobs):
            raise ValueError("poisoned")

        return sample

    monkeypatch.setattr(scheduler_module, "make_sampler", make_sampler)
    streams = Streams()
    scheduler.admit(admission(loaded, "abc", 10, ignore_eos=True), rid=1)
    # A repetition penalty keeps the row on its own sampler (not the fused one).
    poisoned = admission(loaded, "xyz", 10, sampling=Sampling(seed=666, repetition_penalty=1.1))
    scheduler.admit(poisoned, rid=2)
    run(scheduler, streams, [1, 2])
    assert isinstance(streams.ends[2], SequenceFailed)
    assert streams.ends[1] == END and streams.last(1).finish_reason is FinishReason.MAX_TOKENS


def test_unload_ends_sequences_with_a_cancelled_chunk_then_the_error(scheduler, loaded):
    streams = Streams()
    scheduler.admit(admission(loaded, "abc", 40, ignore_eos=True), rid=1)
    for _ in range(3):
        streams.take(scheduler.step())
    scheduler.unload(MODEL_ID)
    streams.take(scheduler.take_output())
    assert streams.last(1).finish_reason is FinishReason.CANCELLED
    assert isinstance(streams.ends[1], RequestAborted)
    with pytest.raises(ModelNotFound):
        scheduler.unload(MODEL_ID)
    scheduler.admit(admission(loaded, "abc", 4), rid=2)  # the model is gone: told, not raised
    streams.take(scheduler.take_output())
    assert isinstance(streams.ends[2], ModelNotFound)
