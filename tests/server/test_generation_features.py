"""Structured output, logprobs, n samples and the request controls, through the real server."""

import asyncio
import json
import re

import grpc
import jsonschema
import pytest
from wire_helpers import field_violations, generate_all, rpc_error, wait_for_subscribers

from mlx_serving.v1 import events_service_pb2 as events_pb
from mlx_serving.v1 import generate_service_pb2 as generate_pb

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL_ID = "tiny"
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000000},
        "coastal": {"type": "boolean"},
    },
    "required": ["city", "population", "coastal"],
    "additionalProperties": False,
}


def request(**fields) -> generate_pb.GenerateRequest:
    fields = {"model_id": MODEL_ID, "text": "Tell me", "max_tokens": 64, **fields}
    return generate_pb.GenerateRequest(**fields)


async def test_json_schema_output_validates_for_many_seeds(generate):
    results = await asyncio.gather(
        *(
            generate_all(generate, request(json_schema=json.dumps(SCHEMA), seed=seed))
            for seed in range(8)
        )
    )
    for responses, text, _ in results:
        assert responses[-1].finish_reason == generate_pb.FINISH_REASON_END_OF_SEQUENCE
        jsonschema.validate(json.loads(text), SCHEMA)


async def test_regex_choice_and_grammar_outputs_hold_in_one_batch(generate):
    regex, choices = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])", ["alpha", "beta", "gamma delta"]
    grammar = 'start: "(" item ("," item)* ")"\nitem: /[0-9]{1,3}/'
    regex_run, choice_run, grammar_run, free_run = await asyncio.gather(
        generate_all(generate, request(regex=regex, seed=1)),
        generate_all(generate, request(choice=generate_pb.Choice(choices=choices), seed=2)),
        generate_all(generate, request(grammar=grammar, seed=3)),
        generate_all(generate, request(seed=4, max_tokens=16)),
    )
    assert re.fullmatch(regex, regex_run[1])
    assert choice_run[1] in choices
    assert re.fullmatch(r"\([0-9]{1,3}(,[0-9]{1,3})*\)", grammar_run[1]), grammar_run[1]
    assert len(free_run[2]) == 16


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"json_schema": "{not json"}, "json_schema"),
        ({"json_schema": '{"type": "strange"}'}, "json_schema"),
        ({"regex": "(unclosed"}, "regex"),
        ({"grammar": "start: nowhere"}, "grammar"),
        ({"json_schema": json.dumps({"enum": ["x" * 70000]})}, "json_schema"),
    ],
)
async def test_a_bad_constraint_is_invalid_argument_naming_its_field(generate, fields, field):
    error = await rpc_error(generate.Generate(request(**fields)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(error)] == [field]


async def test_streamed_logprobs_align_with_tokens(generate):
    responses, _, ids = await generate_all(
        generate, request(logprobs=True, top_logprobs=3, max_tokens=12, prompt_logprobs=1)
    )
    entries = [e for r in responses for e in r.logprobs]
    assert [e.token.token_id for e in entries] == ids
    for response in responses:
        assert len(response.logprobs) == len(response.token_ids)
    for entry in entries:
        tops = [t.logprob for t in entry.top]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry.token.logprob <= tops[0] + 1e-6
    assert len(responses[0].prompt_logprobs) >= 1


async def test_n_samples_stream_with_their_index_seed_and_total_usage(generate):
    responses, _, _ = await generate_all(generate, request(n=3, seed=40, max_tokens=10))
    by_index: dict[int, list] = {}
    for response in responses:
        by_index.setdefault(response.index, []).append(response)
    assert sorted(by_index) == [0, 1, 2]
    for index, sample in by_index.items():
        assert sample[0].seed == 40 + index
        assert sample[-1].usage.completion_tokens == 10
    assert responses[-1].total_usage.completion_tokens == 30
    assert sum(r.HasField("total_usage") for r in responses) == 1
    # Sample 1 is the request seeded 41 alone.
    _, alone, _ = await generate_all(generate, request(seed=41, max_tokens=10))
    assert "".join(r.text for r in by_index[1]) == alone


async def test_an_unseeded_request_is_told_its_seed_and_it_reproduces(generate):
    first, text, _ = await generate_all(generate, request(max_tokens=10))
    assert first[0].HasField("seed")
    _, again, _ = await generate_all(generate, request(max_tokens=10, seed=first[0].seed))
    assert again == text


async def test_client_request_id_is_echoed_in_messages_and_events(generate, events, server):
    subscription = events.Subscribe(
        events_pb.SubscribeRequest(types=[events_pb.EVENT_TYPE_GENERATION_COMPLETED])
    )
    await wait_for_subscribers(server.engine, 1)
    responses, _, _ = await generate_all(
        generate, request(client_request_id="order-7/a", max_tokens=3)
    )
    assert {r.client_request_id for r in responses} == {"order-7/a"}
    event = (await asyncio.wait_for(subscription.read(), 10)).event
    while event.request_id != responses[0].request_id:  # others' requests may end meanwhile
        event = (await asyncio.wait_for(subscription.read(), 10)).event
    assert event.client_request_id == "order-7/a"
    subscription.cancel()


async def test_time_limit_ends_with_its_reason_not_an_error(generate):
    responses, _, ids = await generate_all(
        generate,
        request(max_tokens=100000, ignore_eos=True, time_limit={"nanos": 300_000_000}),
    )
    assert responses[-1].finish_reason == generate_pb.FINISH_REASON_TIME_LIMIT
    assert 0 < responses[-1].usage.completion_tokens == len(ids)


async def test_truncate_prompt_tokens_and_min_tokens(generate):
    long_text = "word " * 5000
    error = await rpc_error(generate.Generate(request(text=long_text, max_tokens=4)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    responses, _, _ = await generate_all(
        generate, request(text=long_text, max_tokens=4, truncate_prompt_tokens=100)
    )
    assert responses[-1].usage.prompt_tokens == 100
    # Past what the context could hold whatever its tokens: cut, not refused.
    huge = "abc " * 1_000_000
    error = await rpc_error(generate.Generate(request(text=huge, max_tokens=4)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    responses, _, _ = await generate_all(
        generate, request(text=huge, max_tokens=4, truncate_prompt_tokens=10)
    )
    assert responses[-1].usage.prompt_tokens == 10
    responses, _, ids = await generate_all(
        generate,
        request(max_tokens=20, min_tokens=6, temperature=0, logit_bias={2: 100.0}),
    )
    # Six tokens, then the end of sequence (counted, not sent: it ended the output).
    assert len(ids) == 6 and responses[-1].usage.completion_tokens == 7
    assert responses[-1].finish_reason == generate_pb.FINISH_REASON_END_OF_SEQUENCE


WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}


def tool_chat(choice: generate_pb.ToolChoice, **fields) -> generate_pb.GenerateRequest:
    chat = generate_pb.ChatPrompt(
        messages=[generate_pb.ChatMessage(role="user", content="Weather in Paris?")],
        tools=[
            generate_pb.Tool(name="get_weather", parameters=json.dumps(WEATHER)),
            generate_pb.Tool(name="get_time"),
        ],
        tool_choice=choice,
    )
    fields = {"max_tokens": 96, **fields}
    return generate_pb.GenerateRequest(model_id=MODEL_ID, chat=chat, **fields)


async def test_a_required_tool_call_is_made_with_valid_arguments_and_parsed(generate):
    required = generate_pb.ToolChoice(mode=generate_pb.TOOL_CHOICE_MODE_REQUIRED)
    runs = await asyncio.gather(
        *(generate_all(generate, tool_chat(required, seed=seed)) for seed in range(6))
    )
    for responses, text, _ in runs:
        last = responses[-1]
        # One call or more: a random model may go on calling until max_tokens cuts it short.
        assert last.finish_reason in (
            generate_pb.FINISH_REASON_END_OF_SEQUENCE,
            generate_pb.FINISH_REASON_STRUCTURE_INCOMPLETE,
        )
        assert text.startswith("<tool_call>\n")
        if last.finish_reason == generate_pb.FINISH_REASON_END_OF_SEQUENCE:
            assert text.endswith("\n</tool_call>")
        assert last.tool_calls, text
        for call in last.tool_calls:
            assert call.name in ("get_weather", "get_time") and call.id.startswith("call_")
            if call.name == "get_weather":
                jsonschema.validate(json.loads(call.arguments), WEATHER)


async def test_a_named_tool_is_the_one_called(generate):
    named = generate_pb.ToolChoice(tool="get_weather")
    responses, _, _ = await generate_all(generate, tool_chat(named, seed=3))
    assert responses[-1].finish_reason == generate_pb.FINISH_REASON_END_OF_SEQUENCE
    (call,) = responses[-1].tool_calls
    assert call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER)


@pytest.mark.parametrize(
    ("choice", "fields", "field"),
    [
        ({"tool": "no_such_tool"}, {}, "chat.tool_choice.tool"),
        ({"tool": "get_weather"}, {"regex": "a+"}, "chat.tool_choice and regex"),
    ],
)
async def test_a_tool_choice_that_cannot_be_honoured_is_refused(generate, choice, fields, field):
    request = tool_chat(generate_pb.ToolChoice(**choice), **fields)
    error = await rpc_error(generate.Generate(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(error)] == [field]


async def test_tool_choice_none_parses_no_calls(generate):
    none = generate_pb.ToolChoice(mode=generate_pb.TOOL_CHOICE_MODE_NONE)
    responses, _, _ = await generate_all(generate, tool_chat(none, seed=1, max_tokens=8))
    assert not responses[-1].tool_calls
