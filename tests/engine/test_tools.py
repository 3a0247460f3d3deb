"""Tool calls read back from model output with mlx-lm's parser for the model's family, and the
chat's tools and calls as the template takes them."""

import json
import re

import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer
from model_variants import model_variant

from mlx_serving.engine.admission import chat_messages, chat_text, chat_tools
from mlx_serving.engine.errors import InvalidRequest
from mlx_serving.engine.requests import (
    TOOL_CHOICE_NONE,
    ChatMessage,
    GenerationRequest,
    Tool,
    ToolCall,
)
from mlx_serving.engine.tools import parse_tool_calls, parser_tools, tool_call_texts

MODEL_ID = "tiny"  # loaded by the engine fixture in conftest.py
WEATHER = Tool("get_weather", "The weather in a city.", '{"type": "object"}')


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return load_tokenizer(model_path)


def marked(name: str, arguments) -> str:
    """A call as the test model's template writes one (Qwen2.5 / Hermes)."""
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def test_the_test_models_template_picks_mlx_lms_json_tool_parser(tokenizer):
    assert tokenizer.has_tool_calling
    assert (tokenizer.tool_call_start, tokenizer.tool_call_end) == ("<tool_call>", "</tool_call>")


def test_calls_in_the_models_format_are_returned_with_json_arguments(tokenizer):
    text = (
        "Let me look. "
        + marked("get_weather", {"city": "Zürich", "days": 2})
        + "\n"
        + marked("get_time", {})
    )
    calls = parse_tool_calls(tokenizer, text)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Zürich", "days": 2}),
        ("get_time", {}),
    ]
    assert '"Zürich"' in calls[0].arguments  # as mlx_lm.server writes them: not ASCII-escaped
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c.id) for c in calls)
    assert calls[0].id != calls[1].id


def test_text_without_a_complete_well_formed_call_gives_none(tokenizer):
    assert parse_tool_calls(tokenizer, "Just an answer.") == ()
    unended = '<tool_call>\n{"name": "get_time", "arguments": {}}'
    assert parse_tool_calls(tokenizer, unended) == ()
    for malformed in ("<tool_call>{not json</tool_call>", '<tool_call>["x"]</tool_call>'):
        assert parse_tool_calls(tokenizer, malformed) == ()
    nameless = '<tool_call>{"arguments": {}}</tool_call><tool_call>{"name": ""}</tool_call>'
    assert parse_tool_calls(tokenizer, nameless) == ()


def test_a_malformed_call_is_skipped_and_the_good_ones_kept(tokenizer):
    text = "<tool_call>{oops}</tool_call>" + marked("get_time", {"zone": "UTC"}) + "<tool_call>{"
    (call,) = parse_tool_calls(tokenizer, text)
    assert (call.name, json.loads(call.arguments)) == ("get_time", {"zone": "UTC"})


def test_a_tokenizer_without_tool_calling_finds_no_calls(model_path, tmp_path):
    plain = model_variant(model_path, tmp_path / "plain", chat_template="{{ messages[0].content }}")
    tokenizer = load_tokenizer(plain)
    assert not tokenizer.has_tool_calling
    assert parse_tool_calls(tokenizer, marked("get_time", {})) == ()


def test_the_templates_calls_parse_back_to_themselves(tokenizer):
    """What the template writes for an assistant's calls is what the parser reads."""
    request = GenerationRequest(
        MODEL_ID,
        messages=(
            ChatMessage("user", "Weather?"),
            ChatMessage(
                "assistant",
                "",
                tool_calls=(
                    ToolCall("a", "get_weather", '{"city": "Paris"}'),
                    ToolCall("b", "get_time", ""),
                ),
            ),
        ),
    )
    text = tokenizer.apply_chat_template(chat_messages(request), tokenize=False)
    calls = parse_tool_calls(tokenizer, text)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {}),
    ]


def test_calls_run_to_the_end_where_a_family_has_no_end_marker():
    text = "a[TOOL_CALLS]f{}[TOOL_CALLS]g{}"
    assert list(tool_call_texts(text, "[TOOL_CALLS]", "")) == ["f{}[TOOL_CALLS]g{}"]
    assert list(tool_call_texts("<a>1</a> <a>2</a> <a>3", "<a>", "</a>")) == ["1", "2"]


def test_parser_tools_leave_out_schemas_that_are_not_objects():
    tools = parser_tools((WEATHER, Tool("broken", parameters="{"), Tool("bare")))
    assert tools is not None
    assert [t["function"].get("parameters") for t in tools] == [{"type": "object"}, None, None]
    assert parser_tools(()) is None


def test_the_chat_text_counts_tool_calls_and_tools_the_template_renders():
    call = ToolCall("a", "get_weather", '{"city": "Paris"}')
    request = GenerationRequest(
        MODEL_ID,
        messages=(ChatMessage("user", "hi"), ChatMessage("assistant", "ok", (call,))),
        tools=(WEATHER,),
    )
    assert chat_text(request) == 'hiok{"city": "Paris"}The weather in a city.{"type": "object"}'
    without_tools = GenerationRequest(**{**request.__dict__, "tool_choice": TOOL_CHOICE_NONE})
    assert chat_text(without_tools) == 'hiok{"city": "Paris"}'
    assert chat_tools(without_tools) is None


def test_a_tool_result_keeps_its_call_id_and_name():
    request = GenerationRequest(
        MODEL_ID, messages=(ChatMessage("tool", "sunny", tool_call_id="a", name="get_weather"),)
    )
    assert chat_messages(request) == [
        {"role": "tool", "content": "sunny", "tool_call_id": "a", "name": "get_weather"}
    ]


def test_arguments_that_are_not_an_object_name_the_call():
    bad = ChatMessage("assistant", "", (ToolCall("a", "f", "{}"), ToolCall("b", "g", "3")))
    request = GenerationRequest(MODEL_ID, messages=(ChatMessage("user", "hi"), bad))
    with pytest.raises(InvalidRequest) as raised:
        chat_messages(request)
    (violation,) = raised.value.violations
    assert violation.field == "chat.messages[1].tool_calls[1].arguments"


async def test_the_engine_parses_calls_with_the_models_tokenizer(engine):
    text = "Sure. " + marked("get_weather", {"city": "Paris"})
    (call,) = engine.parse_tool_calls(MODEL_ID, text, (WEATHER,))
    assert (call.name, call.arguments) == ("get_weather", '{"city": "Paris"}')
    assert engine.parse_tool_calls(MODEL_ID, "no calls") == ()
    assert engine.parse_tool_calls("absent", text) == ()
    request = GenerationRequest(MODEL_ID, messages=(ChatMessage("user", "hi"),), tools=(WEATHER,))
    text, ids = await engine.render_chat(request)
    assert "<tools>" in text and ids
