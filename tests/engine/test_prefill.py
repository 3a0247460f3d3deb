"""Bucketed prefill shapes: the padding changes no token, and the warm-up covers every shape."""

import logging

import mlx.core as mx
import mlx_lm
import pytest
from test_scheduler import MODEL_ID, Streams, admission, run

from mlx_serving.engine import prefill
from mlx_serving.engine.config import EngineConfig
from mlx_serving.engine.engine import Engine
from mlx_serving.engine.models import ModelSource
from mlx_serving.engine.prefill import BUCKETS, bucket_length, shape_lengths, warmup_shapes
from mlx_serving.engine.requests import GenerationRequest
from mlx_serving.engine.requests import SamplingParams as Sampling
from mlx_serving.engine.scheduler import Scheduler


def test_a_chunk_pads_to_the_next_bucket_within_one_step():
    assert [bucket_length(n, 512) for n in (1, 16, 17, 25, 100, 129, 500, 512)] == [
        16,
        16,
        24,
        32,
        128,
        192,
        512,
        512,
    ]
    assert bucket_length(40, 40) == 40  # the step size is a shape of its own
    assert bucket_length(30, 40) == 32
    assert bucket_length(35, 40) == 40  # the bucket past it is cut to the step
    assert bucket_length(1100, 512) == 1024 + 96  # whole steps, then a bucketed rest


def test_the_shapes_are_few_and_each_is_warmed_padded_and_not():
    assert shape_lengths(512) == [b for b in BUCKETS if b <= 512]
    assert shape_lengths(100) == [16, 24, 32, 48, 64, 96, 100]
    shapes = warmup_shapes(8, 512)
    assert len(shapes) == 8 * 11 * 2
    assert {bucket_length(n, 512) for n in range(1, 513)} == {n for _, n, _ in shapes}


PROMPTS = [
    "Once",
    "Hello world, how are you today?",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "def main():\n    return 42",
    "a b c d e f g",
]


def greedy_outputs(loaded, buckets: str, step_size: int) -> list[list[int]]:
    """Every prompt at once (one shared prefill, chunked at `step_size`), greedy, 12 tokens."""
    config = EngineConfig(
        prefill_gather_seconds=0, prefill_step_size=step_size, prefill_buckets=buckets
    )
    scheduler = Scheduler(config)
    scheduler.add_model(loaded)
    generator = scheduler.slots[MODEL_ID].generator
    assert isinstance(generator._prompt_batch, prefill.BucketedPromptBatch) == (buckets == "on")
    streams = Streams()
    with mx.stream(scheduler.stream):
        for rid, text in enumerate(PROMPTS):
            scheduler.admit(admission(loaded, text, 12, ignore_eos=True), rid=rid)
        run(scheduler, streams, range(len(PROMPTS)))
    scheduler.close()
    return [[t for c in streams.chunks[rid] for t in c.token_ids] for rid in range(len(PROMPTS))]


@pytest.mark.parametrize("step_size", [512, 24])
def test_bucketed_prefill_gives_the_same_greedy_tokens(loaded, step_size):
    """Bucketed or not, and chunked (24 tokens a step: the long prompts take several steps,
    each padded), every sequence of a shared prefill decodes the same tokens."""
    plain = greedy_outputs(loaded, "off", step_size)
    assert greedy_outputs(loaded, "on", step_size) == plain
    assert all(len(tokens) == 12 for tokens in plain)


def test_auto_buckets_where_new_shapes_cost_compiles():
    assert prefill.buckets_wanted("auto") == (mx.default_device() == mx.gpu)
    assert prefill.buckets_wanted("on") and not prefill.buckets_wanted("off")


async def test_a_model_is_warmed_up_before_it_serves_and_matches_mlx_lm(
    model_path, reference, caplog, capfd
):
    """Through the engine process: the load compiles every shape (the log tells), then greedy
    output is mlx-lm's own."""
    caplog.set_level(logging.INFO)
    engine = Engine(EngineConfig(prefill_buckets="on", prefill_step_size=64, prefill_batch_size=4))
    await engine.start()
    try:
        await engine.load_model(ModelSource(local_path=str(model_path)), MODEL_ID)
        prompt = "Hello world, how are you today? " * 3
        request = GenerationRequest(
            MODEL_ID, text=prompt, max_tokens=16, sampling=Sampling(temperature=0)
        )
        tokens = [t async for chunk in engine.generate(request) for t in chunk.token_ids]
    finally:
        await engine.shutdown(0)
    model, tokenizer = reference
    expected = [r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=16)]
    assert tokens == expected
    shapes = len(warmup_shapes(4, 64))
    log = capfd.readouterr().err  # the engine process's log
    assert f"{MODEL_ID}: compiling {shapes} prefill shapes" in log
    assert f"{MODEL_ID}: {shapes} prefill shapes compiled in" in log


def paced(pacer, fixed: float, per_token: float, steps: int, rows: int = 1) -> list[int]:
    """The chunks `pacer` picks over `steps` steps of a long prompt, each step taking 10 ms of
    decoding plus `fixed` and `per_token` seconds for each token prefilled."""
    chosen = []
    for _ in range(steps):
        n = pacer.chunk(decoding=4, prefilling=rows, longest=100_000)
        pacer.observe(0.010 + fixed + per_token * n * rows, decoded=True, prompt_tokens=n * rows)
        chosen.append(n)
    return chosen


def settled(chosen: list[int]) -> set[int]:
    """The last ten chunks but the shortest, which is measured again now and then."""
    return set(chosen[-10:]) - {prefill.MIN_PACED_TOKENS}


def decoding_pacer(ratio: float = 3.0) -> prefill.PrefillPacer:
    pacer = prefill.PrefillPacer(step_size=512, ratio=ratio)
    for _ in range(50):
        pacer.observe(0.010, decoded=True, prompt_tokens=0)
    return pacer


def test_the_pacer_prefills_whole_steps_unless_sequences_decode():
    pacer = prefill.PrefillPacer(step_size=512, ratio=3)
    assert pacer.chunk(decoding=4, prefilling=1) == 512  # no decode step measured yet
    pacer.observe(0.010, decoded=True, prompt_tokens=0)
    assert pacer.budget == pytest.approx(0.020)  # (3 - 1) x the decode steps' p99
    assert pacer.chunk(decoding=0, prefilling=1) == 512  # nothing decodes
    assert pacer.chunk(decoding=4, prefilling=1) == prefill.MIN_PACED_TOKENS  # a first measure
    assert prefill.PrefillPacer(512, 0).chunk(decoding=4, prefilling=1) == 512  # off


def test_the_pacer_climbs_to_the_longest_chunk_that_fits():
    """A 5 ms fixed cost and 0.1 ms a token against a 20 ms budget: 150 tokens fit, so 128
    (192 would take 24 ms). The lengths are tried upwards one at a time, none overshooting."""
    chosen = paced(decoding_pacer(), fixed=0.005, per_token=0.0001, steps=40)
    assert chosen[:8] == [16, 24, 32, 48, 64, 96, 128, 128]
    assert chosen[8:].count(128) == 31  # and the shortest once, its measure being stale


def test_the_pacer_backs_off_a_chunk_that_overshoots_and_retries_it_when_stale():
    pacer = decoding_pacer()
    paced(pacer, fixed=0.005, per_token=0.0001, steps=40)
    assert pacer.chunk(decoding=4, prefilling=1, longest=100_000) == 128
    pacer.observe(0.010 + 0.040, decoded=True, prompt_tokens=128)  # one slow step
    chosen = paced(pacer, fixed=0.005, per_token=0.0001, steps=prefill.STALE_STEPS + 2)
    assert chosen[0] == 96
    assert chosen[-1] == 128  # measured again once its overshoot is stale
    # The prompt's later chunks cost more (longer attention): 0.2 ms a token fits 75.
    chosen = paced(pacer, fixed=0.005, per_token=0.0002, steps=30)
    assert max(chosen) <= 128 and settled(chosen) == {64}


def test_the_pacer_never_collapses_when_the_fixed_cost_alone_overshoots():
    """A 30 ms fixed cost against a 20 ms budget: every chunk overshoots. Rather than read the
    prompt 16 tokens a step, each step reads chunks whose tokens take up to about the fixed
    cost (twice the shortest chunk's time, 63 ms: 256 tokens)."""
    chosen = paced(decoding_pacer(), fixed=0.030, per_token=0.0001, steps=60)
    assert chosen[:3] == [16, 24, 32]
    assert max(chosen) == 256
    assert chosen[-20:].count(256) >= 19


def test_the_pacer_measures_each_group_size_apart():
    pacer = decoding_pacer()
    assert settled(paced(pacer, fixed=0.005, per_token=0.0001, steps=40)) == {128}
    assert settled(paced(pacer, fixed=0.005, per_token=0.0001, steps=40, rows=2)) == {64}
    # One row again: its fixed cost measured anew (stale), then its chunk as before.
    assert paced(pacer, fixed=0.005, per_token=0.0001, steps=3) == [16, 128, 128]


def test_a_long_prompt_is_read_in_paced_chunks_while_others_decode(loaded, monkeypatch):
    """Greedy tokens are the unpaced ones, and the long prompt's chunks shrink while the
    other sequence decodes."""
    chunks: list[int] = []
    original = prefill.BucketedPromptBatch.prompt

    def recording(self, tokens):
        chunks.append(max((len(t) for t in tokens), default=0))
        return original(self, tokens)

    monkeypatch.setattr(prefill.BucketedPromptBatch, "prompt", recording)

    def outputs(pacing: float) -> list[list[int]]:
        config = EngineConfig(prefill_gather_seconds=0, prefill_buckets="on", prefill_pacing=pacing)
        scheduler = Scheduler(config)
        scheduler.add_model(loaded)
        streams = Streams()
        with mx.stream(scheduler.stream):
            scheduler.admit(admission(loaded, "Once upon a time", 40, ignore_eos=True), rid=0)
            for _ in range(6):
                streams.take(scheduler.step())
            scheduler.admit(admission(loaded, "word " * 400, 4, ignore_eos=True), rid=1)
            run(scheduler, streams, [0, 1])
        scheduler.close()
        return [[t for c in streams.chunks[rid] for t in c.token_ids] for rid in (0, 1)]

    unpaced = outputs(0)
    assert max(chunks) >= 400  # one step read the whole prompt
    chunks.clear()
    assert outputs(1.5) == unpaced
    assert max(chunks) < 400 and len(chunks) > 2
