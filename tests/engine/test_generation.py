import asyncio

import mlx_lm
import pytest

from mlx_serving.engine.errors import InvalidRequest, ModelNotFound
from mlx_serving.engine.requests import (
    ChatMessage,
    FinishReason,
    GenerationRequest,
    SamplingParams,
)

MODEL_ID = "tiny"  # loaded by the engine fixture in conftest.py

GREEDY = SamplingParams(temperature=0)
PROMPTS = [
    "Hello world",
    "The quick brown fox 🦊 jumps",
    "你好，世界！今天天气很好",
    "def main():\n    return 42",
    "Emoji family 👨‍👩‍👧 and flags 🇯🇵",
    "Ünïcödé façade naïve",
    "1 2 3 4 5 6 7 8",
    "A much longer prompt that goes on and on about nothing in particular, " * 3,
]


async def run(engine, request):
    text, ids, last = "", [], None
    async for chunk in engine.generate(request):
        text += chunk.text
        ids += chunk.token_ids
        last = chunk
    return text, ids, last


def reference_ids(reference, prompt, max_tokens):
    model, tokenizer = reference
    return [
        r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=max_tokens)
    ]


async def test_greedy_matches_mlx_lm_and_stream_concatenates_to_decode(engine, reference):
    prompt = "Hello 👋 你好 世界"
    text, ids, last = await run(
        engine, GenerationRequest(MODEL_ID, text=prompt, max_tokens=48, sampling=GREEDY)
    )
    assert ids == reference_ids(reference, prompt, 48)
    assert text == reference[1].decode(ids)
    assert last.finish_reason is FinishReason.MAX_TOKENS
    assert last.usage.completion_tokens == 48
    assert last.usage.prompt_tokens == len(reference[1].encode(prompt))
    assert last.usage.time_to_first_token > 0
    assert last.usage.tokens_per_second > 0


async def test_concurrent_greedy_requests_each_match_mlx_lm(engine, reference):
    requests = [
        GenerationRequest(MODEL_ID, text=p, max_tokens=24, sampling=GREEDY) for p in PROMPTS
    ]
    results = await asyncio.gather(*(run(engine, r) for r in requests))
    for prompt, (text, ids, _) in zip(PROMPTS, results, strict=True):
        assert ids == reference_ids(reference, prompt, 24), prompt
        assert text == reference[1].decode(ids)


async def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(engine):
    seeded = GenerationRequest(
        MODEL_ID, text="Once upon a time", max_tokens=20, sampling=SamplingParams(1.0, seed=7)
    )
    alone = await run(engine, seeded)
    others = [
        GenerationRequest(MODEL_ID, text=p, max_tokens=30, sampling=SamplingParams(0.9, seed=i))
        for i, p in enumerate(PROMPTS[:3])
    ]
    crowded = await asyncio.gather(run(engine, seeded), *(run(engine, r) for r in others))
    assert crowded[0][1] == alone[1]
    different_seed = GenerationRequest(
        MODEL_ID, text="Once upon a time", max_tokens=20, sampling=SamplingParams(1.0, seed=8)
    )
    assert (await run(engine, different_seed))[1] != alone[1]


async def test_chat_messages_render_through_the_template(engine, reference):
    _, tokenizer = reference
    messages = [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi there 🙂")]
    rendered = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        tokenize=False,
        add_generation_prompt=True,
    )
    prompt_ids = tokenizer.encode(rendered, add_special_tokens=False)
    _, chat_ids, last = await run(
        engine,
        GenerationRequest(MODEL_ID, messages=tuple(messages), max_tokens=12, sampling=GREEDY),
    )
    _, token_ids, _ = await run(
        engine,
        GenerationRequest(MODEL_ID, token_ids=tuple(prompt_ids), max_tokens=12, sampling=GREEDY),
    )
    assert last.usage.prompt_tokens == len(prompt_ids)
    assert chat_ids == token_ids


async def test_max_tokens_is_clipped_to_the_context_length(engine):
    context = engine.get_model(MODEL_ID).context_length
    prompt = tuple([5] * (context - 3))
    _, ids, last = await run(
        engine, GenerationRequest(MODEL_ID, token_ids=prompt, max_tokens=10, sampling=GREEDY)
    )
    assert len(ids) == 3
    assert last.finish_reason is FinishReason.CONTEXT_LENGTH


async def test_a_prompt_filling_the_context_is_rejected(engine):
    context = engine.get_model(MODEL_ID).context_length
    with pytest.raises(InvalidRequest) as caught:
        await run(engine, GenerationRequest(MODEL_ID, token_ids=tuple([5] * context)))
    assert [v.field for v in caught.value.violations] == ["tokens.ids"]


async def test_token_ids_past_the_vocabulary_are_rejected_by_index(engine):
    vocab = engine.get_model(MODEL_ID).vocab_size
    with pytest.raises(InvalidRequest) as caught:
        await run(engine, GenerationRequest(MODEL_ID, token_ids=(1, vocab, 2, vocab + 5)))
    assert [v.field for v in caught.value.violations] == ["tokens.ids[1]", "tokens.ids[3]"]
    assert engine.active_requests() == 0


async def test_unknown_model(engine):
    with pytest.raises(ModelNotFound):
        await run(engine, GenerationRequest("nope", text="hi"))
