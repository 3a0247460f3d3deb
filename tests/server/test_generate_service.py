import asyncio
import re

import grpc
import pytest
from engine_probes import wait_until_idle
from wire_helpers import (
    field_violations,
    generate_all,
    rpc_error,
    violated_fields,
)

from mlx_serving.v1 import generate_service_pb2 as generate_pb
from mlx_serving.v1 import tokenize_service_pb2 as tokenize_pb

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL_ID = "tiny"  # preloaded by the server fixture
VOCAB_SIZE = 2048
PROMPT = "Hello 👋 你好 世界"


def greedy(max_tokens: int = 8, **kwargs) -> generate_pb.GenerateRequest:
    kwargs = {"model_id": MODEL_ID, "text": PROMPT, "temperature": 0, **kwargs}
    return generate_pb.GenerateRequest(max_tokens=max_tokens, **kwargs)


def long_request() -> generate_pb.GenerateRequest:
    """Runs until the model's context is full (~20 s): only ever cut short."""
    return greedy(max_tokens=100_000, ignore_eos=True)


async def test_a_greedy_stream_carries_one_request_id_and_ends_with_usage(generate, tokenize):
    responses, text, ids = await generate_all(generate, greedy(max_tokens=8))
    request_ids = {r.request_id for r in responses}
    assert len(request_ids) == 1 and re.fullmatch(r"[0-9a-f]{32}", request_ids.pop())
    *middle, last = responses
    assert all(r.finish_reason == generate_pb.FINISH_REASON_UNSPECIFIED for r in middle)
    assert not any(r.HasField("usage") for r in middle)
    assert last.finish_reason == generate_pb.FINISH_REASON_MAX_TOKENS
    assert last.matched_stop == ""
    prompt = await tokenize.Tokenize(
        tokenize_pb.TokenizeRequest(model_id=MODEL_ID, text=PROMPT, add_special_tokens=True)
    )
    usage = last.usage
    assert usage.prompt_tokens == len(prompt.token_ids)
    assert usage.completion_tokens == len(ids) == 8
    assert usage.time_to_first_token.ToNanoseconds() > 0
    assert usage.total_time.ToNanoseconds() >= usage.time_to_first_token.ToNanoseconds()
    assert usage.tokens_per_second > 0
    decoded = await tokenize.Detokenize(
        tokenize_pb.DetokenizeRequest(model_id=MODEL_ID, token_ids=ids)
    )
    assert text == decoded.text


async def test_every_request_gets_its_own_id_and_greedy_output_is_repeatable(generate):
    first, second = await asyncio.gather(
        generate_all(generate, greedy()), generate_all(generate, greedy())
    )
    assert first[0][0].request_id != second[0][0].request_id
    assert first[1:] == second[1:]


async def test_a_text_prompt_and_its_token_ids_continue_alike(generate, tokenize):
    prompt = await tokenize.Tokenize(
        tokenize_pb.TokenizeRequest(model_id=MODEL_ID, text=PROMPT, add_special_tokens=True)
    )
    _, text, ids = await generate_all(generate, greedy())
    as_tokens = greedy(text=None, tokens=generate_pb.TokenIds(ids=prompt.token_ids))
    assert (await generate_all(generate, as_tokens))[1:] == (text, ids)


async def test_chat_messages_render_through_the_chat_template(generate, hf_tokenizer):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Bonjour 👋, 你好?"},
    ]
    rendered = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    prompt_ids = hf_tokenizer.encode(rendered, add_special_tokens=False)
    chat = generate_pb.ChatPrompt(messages=[generate_pb.ChatMessage(**m) for m in messages])
    responses, text, ids = await generate_all(generate, greedy(text=None, chat=chat))
    assert responses[-1].usage.prompt_tokens == len(prompt_ids)
    as_tokens = greedy(text=None, tokens=generate_pb.TokenIds(ids=prompt_ids))
    assert (await generate_all(generate, as_tokens))[1:] == (text, ids)
    # add_generation_prompt=false drops the assistant prefix.
    chat.add_generation_prompt = False
    without = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False
    )
    responses, _, _ = await generate_all(generate, greedy(max_tokens=1, text=None, chat=chat))
    assert responses[-1].usage.prompt_tokens == len(
        hf_tokenizer.encode(without, add_special_tokens=False)
    )


async def test_a_stop_string_ends_the_stream_and_is_reported(generate):
    _, full, _ = await generate_all(generate, greedy(max_tokens=16))
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    responses, text, _ = await generate_all(generate, greedy(max_tokens=16, stop=[stop]))
    assert text == full[: full.index(stop)]
    assert responses[-1].finish_reason == generate_pb.FINISH_REASON_STOP_SEQUENCE
    assert responses[-1].matched_stop == stop


async def test_a_stop_token_id_ends_the_stream(generate):
    _, _, ids = await generate_all(generate, greedy(max_tokens=8))
    responses, _, got = await generate_all(generate, greedy(max_tokens=8, stop_token_ids=[ids[3]]))
    assert got == ids[: ids.index(ids[3])]
    assert responses[-1].finish_reason == generate_pb.FINISH_REASON_STOP_SEQUENCE


async def test_unset_sampling_fields_take_the_engine_defaults(generate):
    """Unset temperature means 1.0 (sampling), so it matches an explicit 1.0 with one seed."""
    implicit = generate_pb.GenerateRequest(model_id=MODEL_ID, text=PROMPT, max_tokens=12, seed=7)
    explicit = generate_pb.GenerateRequest(
        model_id=MODEL_ID, text=PROMPT, max_tokens=12, seed=7, temperature=1.0, top_p=1.0
    )
    _, _, sampled = await generate_all(generate, implicit)
    assert (await generate_all(generate, explicit))[2] == sampled
    assert (await generate_all(generate, implicit))[2] == sampled
    assert (await generate_all(generate, greedy(max_tokens=12)))[2] != sampled


async def test_an_unknown_model_is_not_found(generate):
    error = await rpc_error(generate.Generate(greedy(text="hi", model_id="absent")))
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert "absent" in error.details()


@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        (generate_pb.GenerateRequest(model_id=MODEL_ID), ["prompt"]),
        (generate_pb.GenerateRequest(model_id=MODEL_ID, text=""), ["text"]),
        (generate_pb.GenerateRequest(text="hi"), ["model_id"]),
        (greedy(temperature=2.5), ["temperature"]),
        (greedy(top_p=0), ["top_p"]),
        (greedy(top_p=1.5), ["top_p"]),
        (greedy(max_tokens=0), ["max_tokens"]),
        (greedy(min_p=2), ["min_p"]),
        (greedy(logit_bias={5: 101.0}), ["logit_bias[5]"]),
        (greedy(stop=["x", "x"]), ["stop"]),
        (greedy(stop=["ok", ""]), ["stop[1]"]),
        (greedy(text=None, tokens=generate_pb.TokenIds()), ["tokens.ids"]),
        (greedy(text=None, chat=generate_pb.ChatPrompt()), ["chat.messages"]),
        (
            greedy(
                text=None,
                chat=generate_pb.ChatPrompt(
                    messages=[
                        generate_pb.ChatMessage(role="user", content="hi"),
                        generate_pb.ChatMessage(role="", content="hi"),
                    ]
                ),
            ),
            ["chat.messages[1].role"],
        ),
        (
            generate_pb.GenerateRequest(temperature=3, top_p=0),
            ["prompt", "model_id", "temperature", "top_p"],
        ),
    ],
)
async def test_contract_violations_are_invalid_argument_naming_each_field(
    generate, request_, fields
):
    assert violated_fields(await rpc_error(generate.Generate(request_))) == fields


async def test_the_rule_message_describes_the_violation(generate):
    error = await rpc_error(generate.Generate(greedy(temperature=2.5)))
    assert field_violations(error) == [
        ("temperature", "must be greater than or equal to 0 and less than or equal to 2")
    ]
    assert "temperature" in error.details()


async def test_token_ids_past_the_vocabulary_are_named_by_index(generate):
    ids = [1, 2, 3, VOCAB_SIZE, 4, VOCAB_SIZE + 7]
    error = await rpc_error(generate.Generate(greedy(text=None, tokens={"ids": ids})))
    assert field_violations(error) == [
        ("tokens.ids[3]", f"token id {VOCAB_SIZE} is not below the vocabulary size {VOCAB_SIZE}"),
        ("tokens.ids[5]", f"token id {VOCAB_SIZE + 7} is not below the vocabulary size 2048"),
    ]


async def test_stop_token_ids_and_logit_bias_past_the_vocabulary_are_named(generate):
    request = greedy(stop_token_ids=[5, 9999], logit_bias={70000: 1.0})
    error = await rpc_error(generate.Generate(request))
    assert violated_fields(error) == ["stop_token_ids[1]", "logit_bias[70000]"]


async def test_a_client_cancel_mid_stream_frees_the_engine(generate, server):
    call = generate.Generate(long_request())
    await call.read()
    await call.read()
    assert server.engine.active_requests() == 1
    call.cancel()
    assert call.cancelled()
    await wait_until_idle(server.engine)


async def test_an_expired_deadline_ends_the_stream_and_frees_the_engine(generate, server):
    call = generate.Generate(long_request(), timeout=2.0)
    await call.read()
    error = await rpc_error(call)
    assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_until_idle(server.engine)


async def test_special_tokens_are_hidden_from_the_text_unless_asked_for(generate, hf_tokenizer):
    eos = hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    forced = {"ignore_eos": True, "logit_bias": {eos: 100.0}}
    _, text, ids = await generate_all(generate, greedy(max_tokens=4, **forced))
    assert ids == [eos] * 4 and text == ""
    _, shown, ids = await generate_all(
        generate, greedy(max_tokens=4, include_special_tokens=True, **forced)
    )
    assert ids == [eos] * 4 and shown == "<|im_end|>" * 4
