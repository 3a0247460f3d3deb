"""Stops, the sampling set, backpressure and the prefix cache, through the engine."""

import asyncio

import mlx_lm
import pytest
from engine_probes import (
    delivered,
    first_tokens,
    probe,
    record_deliveries,
    record_first_tokens,
    wait_until_idle,
)

from mlx_serving.engine.config import EngineConfig
from mlx_serving.engine.engine import Engine
from mlx_serving.engine.errors import EngineOverloaded, InvalidRequest
from mlx_serving.engine.models import ModelSource
from mlx_serving.engine.requests import (
    ChatMessage,
    FinishReason,
    GenerationRequest,
    SamplingParams,
)

MODEL_ID = "tiny"  # loaded by the engine fixture in conftest.py
GREEDY = SamplingParams(temperature=0)


async def run(engine, request):
    chunks = [c async for c in engine.generate(request)]
    return "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids], chunks


async def greedy_text(engine, prompt, max_tokens=40):
    request = GenerationRequest(MODEL_ID, text=prompt, max_tokens=max_tokens, sampling=GREEDY)
    return await run(engine, request)


async def test_a_stop_string_spanning_tokens_cuts_the_text_and_is_reported(engine, reference):
    full, ids, _ = await greedy_text(engine, "Hello world")
    # A stop string made of the end of one token and the start of the next.
    pieces = [reference[1].decode(ids[:i]) for i in range(1, len(ids) + 1)]
    boundary = next(i for i in range(3, len(pieces)) if len(pieces[i]) - len(pieces[i - 1]) >= 2)
    cut = len(pieces[boundary - 1])
    stop = full[cut - 1 : cut + 1]
    expected = full[: full.index(stop)]
    request = GenerationRequest(
        MODEL_ID, text="Hello world", max_tokens=40, sampling=GREEDY, stop=(stop,)
    )
    text, _, chunks = await run(engine, request)
    assert text == expected
    assert chunks[-1].finish_reason is FinishReason.STOP_SEQUENCE
    assert chunks[-1].matched_stop == stop
    shown = ""
    for chunk in chunks:  # no chunk ever shows text that is later retracted
        shown += chunk.text
        assert expected.startswith(shown)
    included = GenerationRequest(
        MODEL_ID,
        text="Hello world",
        max_tokens=40,
        sampling=GREEDY,
        stop=(stop,),
        include_stop=True,
    )
    assert (await run(engine, included))[0] == expected + stop


async def test_stop_strings_end_sequences_alike_inside_a_busy_batch(engine):
    """Eight sequences with stops: their tokens are rendered on the engine's rendering thread."""
    prompts = ["Hello world", "1 2 3 4", "def f():", "Once upon", "abc", "xyz", "The end", "Q:"]
    alone = [await greedy_text(engine, prompt) for prompt in prompts]
    stops = [full[len(full) // 2 : len(full) // 2 + 2] for full, _, _ in alone]
    requests = [
        GenerationRequest(MODEL_ID, text=p, max_tokens=40, sampling=GREEDY, stop=(stop,))
        for p, stop in zip(prompts, stops, strict=True)
    ]
    together = await asyncio.gather(*(run(engine, request) for request in requests))
    for (full, ids, _), stop, (text, _, chunks) in zip(alone, stops, together, strict=True):
        assert text == full[: full.index(stop)]
        assert chunks[-1].finish_reason is FinishReason.STOP_SEQUENCE
        assert chunks[-1].matched_stop == stop
        emitted = [t for c in chunks for t in c.token_ids]
        assert emitted == ids[: len(emitted)]
        assert chunks[-1].usage.completion_tokens == len(emitted)
    await wait_until_idle(engine)


async def test_a_finished_sequences_end_is_not_held_back_a_step(engine):
    """In a busy batch tokens reach readers a step late, but not the last one: its client may
    be waiting to send its next request. So the second-to-last token, the final chunk and the
    end of the stream leave in one message."""
    await probe(engine, record_deliveries)
    prompts = ["Hello world", "1 2 3 4", "def f():", "Once upon", "abc", "xyz"]
    requests = [
        GenerationRequest(MODEL_ID, text=p, max_tokens=6, sampling=GREEDY, ignore_eos=True)
        for p in prompts
    ]
    together = await asyncio.gather(*(run(engine, request) for request in requests))
    assert all(chunks[-1].finish_reason is FinishReason.MAX_TOKENS for *_, chunks in together)
    messages = await probe(engine, delivered)
    for rid in {rid for message in messages for rid in message}:
        last = [message for message in messages if rid in message][-1]
        assert last.count(rid) == 3  # a token, the final chunk, the end marker
    await wait_until_idle(engine)


async def test_a_first_token_is_not_held_back_a_step(engine):
    """Nor is the first: it is the client's time to first token."""
    await probe(engine, record_first_tokens)
    requests = [
        GenerationRequest(MODEL_ID, text=f"{i} bottles", max_tokens=8, sampling=GREEDY)
        for i in range(6)
    ]
    await asyncio.gather(*(run(engine, request) for request in requests))
    entries = await probe(engine, first_tokens)
    assert sum(len(produced) for produced, _ in entries) == 6
    assert max(len(produced) for produced, _ in entries) >= 4  # a step the thread would take
    for produced, carried in entries:
        assert set(produced) <= carried
    await wait_until_idle(engine)


async def test_stop_token_ids_and_ignore_eos(engine, reference):
    _, ids, _ = await greedy_text(engine, "Hello world", 20)
    request = GenerationRequest(
        MODEL_ID, text="Hello world", max_tokens=20, sampling=GREEDY, stop_token_ids=(ids[5],)
    )
    text, got, chunks = await run(engine, request)
    first = ids.index(ids[5])
    assert got == ids[:first]
    assert chunks[-1].finish_reason is FinishReason.STOP_SEQUENCE
    assert chunks[-1].matched_stop == reference[1].decode([ids[5]])
    # Bias EOS to the top: the model ends at once, unless EOS is ignored.
    eos = reference[1].eos_token_id
    biased = SamplingParams(temperature=0, logit_bias=((eos, 100.0),))
    _, got, chunks = await run(engine, GenerationRequest(MODEL_ID, text="Hi", sampling=biased))
    assert got == [] and chunks[-1].finish_reason is FinishReason.END_OF_SEQUENCE
    request = GenerationRequest(MODEL_ID, text="Hi", max_tokens=4, sampling=biased, ignore_eos=True)
    _, got, chunks = await run(engine, request)
    assert got == [eos] * 4 and chunks[-1].finish_reason is FinishReason.MAX_TOKENS


async def test_penalties_match_mlx_lm(engine, reference):
    from mlx_lm.sample_utils import make_logits_processors

    model, tokenizer = reference
    sampling = SamplingParams(
        temperature=0,
        repetition_penalty=1.3,
        presence_penalty=0.5,
        frequency_penalty=0.2,
        penalty_context=16,
    )
    _, got, _ = await run(
        engine, GenerationRequest(MODEL_ID, text="la la la", max_tokens=30, sampling=sampling)
    )
    processors = make_logits_processors(
        repetition_penalty=1.3,
        repetition_context_size=16,
        presence_penalty=0.5,
        presence_context_size=16,
        frequency_penalty=0.2,
        frequency_context_size=16,
    )
    expected = [
        r.token
        for r in mlx_lm.stream_generate(
            model, tokenizer, "la la la", max_tokens=30, logits_processors=processors
        )
    ]
    assert got == expected
    plain = (await greedy_text(engine, "la la la", 30))[1]
    assert plain != expected


@pytest.fixture
async def per_row_engine(model_path):
    """The engine with mlx-lm's per-row samplers (engine.fused_sampler off)."""
    engine = Engine(EngineConfig(fused_sampler=False))
    await engine.start()
    await engine.load_model(ModelSource(local_path=str(model_path)), MODEL_ID)
    yield engine
    await engine.shutdown(0)


@pytest.mark.parametrize(
    "controls",
    [{"top_k": 50, "min_p": 0.05}, {"top_p": 0.9, "min_p": 0.05}],
    ids=["top_k-min_p", "top_p-min_p"],
)
async def test_seeded_sampling_matches_mlx_lm(per_row_engine, reference, controls):
    """With engine.fused_sampler off, a seeded request draws, in the engine's batch, what
    mlx-lm draws alone from that seed. (The fused sampler draws from its own per-row hash:
    test_fused_sample.py checks its distribution, not mlx-lm's draws.)

    top_k with top_p is left out: the two samplers apply them in different orders (see
    test_sampling.py, which compares the samplers draw for draw on fixed log-probabilities).
    """
    engine = per_row_engine
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = reference

    async def sampled(**controls) -> list[int]:
        sampling = SamplingParams(temperature=1.5, seed=3, **controls)
        request = GenerationRequest(MODEL_ID, text="Once", max_tokens=16, sampling=sampling)
        return (await run(engine, request))[1]

    got = await sampled(**controls)
    sampler = make_sampler(
        temp=1.5,
        top_p=controls.get("top_p", 1.0),
        min_p=controls.get("min_p", 0.0),
        top_k=controls.get("top_k", 0),
    )
    # mlx-lm samples with the global key: seeded, it is key(3), split each step as ours is.
    mx.random.seed(3)
    expected = [
        r.token
        for r in mlx_lm.stream_generate(model, tokenizer, "Once", max_tokens=16, sampler=sampler)
    ]
    assert got == expected
    assert await sampled(**controls) == got  # reproducible
    assert await sampled() != got  # the controls changed what was drawn


async def test_invalid_token_ids_in_controls_are_named(engine):
    vocab = engine.get_model(MODEL_ID).vocab_size
    request = GenerationRequest(
        MODEL_ID,
        text="x",
        stop_token_ids=(1, vocab),
        sampling=SamplingParams(logit_bias=((vocab + 1, 1.0),)),
    )
    with pytest.raises(InvalidRequest) as caught:
        await run(engine, request)
    assert [v.field for v in caught.value.violations] == [
        "stop_token_ids[1]",
        f"logit_bias[{vocab + 1}]",
    ]


async def test_a_full_queue_refuses_with_retry_after(model_path):
    engine = Engine(EngineConfig(max_batch_size=2, max_queued_requests=1, retry_after_seconds=0.5))
    await engine.start()
    await engine.load_model(ModelSource(local_path=str(model_path)), MODEL_ID)
    streams = [
        engine.generate(GenerationRequest(MODEL_ID, text="x", max_tokens=10_000)) for _ in range(3)
    ]
    for stream in streams:
        await anext(stream)
    with pytest.raises(EngineOverloaded) as caught:
        await anext(engine.generate(GenerationRequest(MODEL_ID, text="x")))
    assert caught.value.retry_after == 0.5
    for stream in streams:
        await stream.aclose()
    await asyncio.sleep(0.1)
    await run(engine, GenerationRequest(MODEL_ID, text="x", max_tokens=2))
    await engine.shutdown(0)


async def test_a_second_chat_turn_reuses_the_first_turns_cache(engine, reference):
    model, tokenizer = reference
    turn = [ChatMessage("user", "Tell me about the sea.")]
    first, _, chunks = await run(
        engine, GenerationRequest(MODEL_ID, messages=tuple(turn), max_tokens=24, sampling=GREEDY)
    )
    assert chunks[-1].usage.cached_prompt_tokens == 0
    second = (*turn, ChatMessage("assistant", first), ChatMessage("user", "And the sky?"))
    _, warm, chunks = await run(
        engine, GenerationRequest(MODEL_ID, messages=second, max_tokens=24, sampling=GREEDY)
    )
    assert chunks[-1].usage.cached_prompt_tokens > 10
    rendered = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in second],
        tokenize=False,
        add_generation_prompt=True,
    )
    prompt = tokenizer.encode(rendered, add_special_tokens=False)
    cold = [r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=24)]
    assert warm == cold
