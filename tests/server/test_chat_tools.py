"""Chats with tools, tool calls and template arguments, and RenderChatTemplate, through the real
server: the prompt must be exactly what mlx-lm's own chat template call makes of the chat."""

import json

import grpc
import pytest
from google.protobuf import struct_pb2
from mlx_lm.tokenizer_utils import load as load_tokenizer
from model_variants import model_variant, model_without_chat_template
from wire_helpers import field_violations, generate_all, rpc_error

from mlx_serving.engine.config import EngineConfig
from mlx_serving.v1 import generate_service_pb2 as generate_pb
from mlx_serving.v1 import model_service_pb2 as model_pb
from mlx_serving.v1 import tokenize_service_pb2 as tokenize_pb
from mlx_serving.v1 import tokenize_service_pb2_grpc as tokenize_grpc

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL_ID = "tiny"  # preloaded by the server fixture
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"],
}
ARGUMENTS = {"city": "Paris", "days": 2}
# A template that reads a mlx-lm kwarg (enable_thinking) and one of the caller's own.
KWARGS_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    "{%- if enable_thinking %}{{- '<think>\\n' }}{%- else %}{{- '<think></think>' }}{%- endif %}"
    "{%- if persona is defined %}{{- 'as ' + persona }}{%- endif %}"
)


@pytest.fixture(scope="module")
def mlx_tokenizer(model_path):
    """The test model's tokenizer as mlx-lm loads it: the reference for rendered chats."""
    return load_tokenizer(model_path)


def tools() -> list[generate_pb.Tool]:
    return [
        generate_pb.Tool(
            name="get_weather",
            description="The weather in a city.",
            parameters=json.dumps(WEATHER_SCHEMA),
        ),
        generate_pb.Tool(name="get_time"),
    ]


def messages() -> list[generate_pb.ChatMessage]:
    call = generate_pb.ToolCall(id="call_1", name="get_weather", arguments=json.dumps(ARGUMENTS))
    return [
        generate_pb.ChatMessage(role="system", content="Be brief."),
        generate_pb.ChatMessage(role="user", content="Weather in Paris? 🌧️"),
        generate_pb.ChatMessage(role="assistant", content="", tool_calls=[call]),
        generate_pb.ChatMessage(
            role="tool", content='{"sky": "rain"}', tool_call_id="call_1", name="get_weather"
        ),
    ]


def chat(**kwargs) -> generate_pb.ChatPrompt:
    return generate_pb.ChatPrompt(**{"messages": messages(), "tools": tools(), **kwargs})


def hf_messages() -> list[dict]:
    """messages() as Hugging Face templates take them, written out by hand."""
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ARGUMENTS},
    }
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris? 🌧️"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {
            "role": "tool",
            "content": '{"sky": "rain"}',
            "tool_call_id": "call_1",
            "name": "get_weather",
        },
    ]


def hf_tools() -> list[dict]:
    weather = {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": WEATHER_SCHEMA,
    }
    return [
        {"type": "function", "function": weather},
        {"type": "function", "function": {"name": "get_time"}},
    ]


def render_request(
    prompt: generate_pb.ChatPrompt, model_id: str = MODEL_ID
) -> tokenize_pb.RenderChatTemplateRequest:
    return tokenize_pb.RenderChatTemplateRequest(model_id=model_id, chat=prompt)


def template_kwargs(**values) -> struct_pb2.Struct:
    kwargs = struct_pb2.Struct()
    kwargs.update(values)
    return kwargs


async def test_the_rendered_chat_is_mlx_lms_and_what_generation_reads(
    tokenize, generate, mlx_tokenizer
):
    rendered = await tokenize.RenderChatTemplate(render_request(chat()))
    expected = mlx_tokenizer.apply_chat_template(
        hf_messages(), tools=hf_tools(), tokenize=False, add_generation_prompt=True
    )
    assert rendered.text == expected
    assert list(rendered.token_ids) == mlx_tokenizer.encode(expected, add_special_tokens=False)
    request = generate_pb.GenerateRequest(
        model_id=MODEL_ID, chat=chat(), max_tokens=1, temperature=0
    )
    responses, _, _ = await generate_all(generate, request)
    assert responses[-1].usage.prompt_tokens == len(rendered.token_ids)


async def test_tools_calls_and_results_appear_in_the_rendered_text(tokenize):
    text = (await tokenize.RenderChatTemplate(render_request(chat()))).text
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    schema = json.dumps(WEATHER_SCHEMA)
    assert '"name": "get_weather", "description": "The weather in a city.", ' in text
    assert f'"parameters": {schema}' in text
    assert '{"type": "function", "function": {"name": "get_time"}}' in text
    call = json.dumps({"name": "get_weather", "arguments": ARGUMENTS})
    assert f"<|im_start|>assistant\n<tool_call>\n{call}\n</tool_call><|im_end|>\n" in text
    assert '<|im_start|>user\n<tool_response>\n{"sky": "rain"}\n</tool_response><|im_end|>' in text
    assert text.endswith("<|im_start|>assistant\n")


async def test_tool_choice_none_leaves_the_tools_out_and_a_named_tool_keeps_them(tokenize):
    none = generate_pb.ToolChoice(mode=generate_pb.TOOL_CHOICE_MODE_NONE)
    without = await tokenize.RenderChatTemplate(render_request(chat(tool_choice=none)))
    no_tools = await tokenize.RenderChatTemplate(render_request(chat(tools=[])))
    assert without == no_tools
    assert "<tools>" not in without.text and "<tool_call>" in without.text
    named = generate_pb.ToolChoice(tool="get_weather")
    kept = await tokenize.RenderChatTemplate(render_request(chat(tool_choice=named)))
    assert kept == await tokenize.RenderChatTemplate(render_request(chat()))
    assert "<tools>" in kept.text


async def test_add_generation_prompt_false_ends_at_the_last_turn(tokenize, mlx_tokenizer):
    rendered = await tokenize.RenderChatTemplate(render_request(chat(add_generation_prompt=False)))
    expected = mlx_tokenizer.apply_chat_template(
        hf_messages(), tools=hf_tools(), tokenize=False, add_generation_prompt=False
    )
    assert rendered.text == expected and expected.endswith("</tool_response><|im_end|>\n")


def with_arguments(arguments: str) -> generate_pb.ChatPrompt:
    prompt = chat()
    prompt.messages[2].tool_calls[0].arguments = arguments
    return prompt


def with_parameters(index: int, parameters: str) -> generate_pb.ChatPrompt:
    prompt = chat()
    prompt.tools[index].parameters = parameters
    return prompt


@pytest.mark.parametrize(
    ("prompt", "field", "description"),
    [
        (with_arguments('{"city": '), "chat.messages[2].tool_calls[0].arguments", "not valid JSON"),
        (with_arguments("[1, 2]"), "chat.messages[2].tool_calls[0].arguments", "not a JSON object"),
        (with_arguments("[" * 100_000), "chat.messages[2].tool_calls[0].arguments", "JSON"),
        (with_parameters(1, "{'type': 'object'}"), "chat.tools[1].parameters", "not valid JSON"),
        (with_parameters(0, '"object"'), "chat.tools[0].parameters", "not a JSON object"),
        (
            chat(template_kwargs=template_kwargs(tokenize=True)),
            "chat.template_kwargs",
            "'tokenize'",
        ),
    ],
)
async def test_a_bad_tool_or_template_argument_is_invalid_naming_its_field(
    tokenize, generate, prompt, field, description
):
    for call in (
        tokenize.RenderChatTemplate(render_request(prompt)),
        generate.Generate(generate_pb.GenerateRequest(model_id=MODEL_ID, chat=prompt)),
    ):
        ((violated, why),) = field_violations(await rpc_error(call))
        assert violated == field and description in why


async def test_bad_parameters_are_refused_even_when_the_tools_are_left_out(tokenize):
    none = generate_pb.ToolChoice(mode=generate_pb.TOOL_CHOICE_MODE_NONE)
    prompt = with_parameters(0, "{")
    prompt.tool_choice.CopyFrom(none)
    error = await rpc_error(tokenize.RenderChatTemplate(render_request(prompt)))
    assert [field for field, _ in field_violations(error)] == ["chat.tools[0].parameters"]


async def test_tool_call_arguments_count_toward_the_prompts_size(tokenize):
    """Refused before rendering, as a long message would be: arguments are prompt text too."""
    prompt = with_arguments(json.dumps({"text": "word " * 200_000}))
    ((field, description),) = field_violations(
        await rpc_error(tokenize.RenderChatTemplate(render_request(prompt)))
    )
    assert field == "chat.messages" and "bytes" in description


async def test_template_kwargs_reach_the_template(tokenize, models, model_path, tmp_path):
    source = model_variant(model_path, tmp_path / "kwargs", chat_template=KWARGS_TEMPLATE)
    reference = load_tokenizer(source)
    location = model_pb.ModelSource(local_path=str(source))
    await models.LoadModel(model_pb.LoadModelRequest(model_id="kwargs", source=location))
    try:
        plain = generate_pb.ChatPrompt(
            messages=[generate_pb.ChatMessage(role="user", content="hi")]
        )
        default = await tokenize.RenderChatTemplate(render_request(plain, "kwargs"))
        assert default.text.endswith("<|im_start|>assistant\n<think></think>")
        plain.template_kwargs.CopyFrom(template_kwargs(enable_thinking=True, persona="Ada"))
        thinking = await tokenize.RenderChatTemplate(render_request(plain, "kwargs"))
        expected = reference.apply_chat_template(
            [{"role": "user", "content": "hi"}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=True,
            persona="Ada",
        )
        assert thinking.text == expected and expected.endswith("assistant\n<think>\nas Ada")
    finally:
        await models.UnloadModel(model_pb.UnloadModelRequest(model_id="kwargs"))


async def test_unknown_models_are_not_found_and_template_less_ones_invalid(
    tokenize, models, model_path, tmp_path
):
    error = await rpc_error(tokenize.RenderChatTemplate(render_request(chat(), "absent")))
    assert error.code() is grpc.StatusCode.NOT_FOUND
    source = model_without_chat_template(model_path, tmp_path / "plain")
    location = model_pb.ModelSource(local_path=str(source))
    await models.LoadModel(model_pb.LoadModelRequest(model_id="plain", source=location))
    try:
        error = await rpc_error(tokenize.RenderChatTemplate(render_request(chat(), "plain")))
        assert field_violations(error) == [("chat", "the model has no chat template")]
    finally:
        await models.UnloadModel(model_pb.UnloadModelRequest(model_id="plain"))


async def test_a_missing_chat_is_a_contract_violation(tokenize):
    request = tokenize_pb.RenderChatTemplateRequest(model_id=MODEL_ID)
    assert [
        field
        for field, _ in field_violations(await rpc_error(tokenize.RenderChatTemplate(request)))
    ] == ["chat"]


async def test_rendering_counts_against_the_tokenize_limit(fresh_server):
    app = await fresh_server(EngineConfig(max_concurrent_tokenize=0))
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = tokenize_grpc.TokenizeServiceStub(channel)
        error = await rpc_error(stub.RenderChatTemplate(render_request(chat())))
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
