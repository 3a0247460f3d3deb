"""Tools in the chat template's format, and tool calls read back from a model's output.

The calls are parsed as mlx_lm.server parses them: the text between the model family's start
and end markers goes to mlx-lm's tool parser for that family (TokenizerWrapper.tool_parser).
"""

import json
import logging
import secrets
from collections.abc import Iterator
from typing import Any

from .requests import Tool, ToolCall

log = logging.getLogger(__name__)


def template_tool(tool: Tool, parameters: dict | None) -> dict[str, Any]:
    """A tool as Hugging Face chat templates and mlx-lm's tool parsers take it."""
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


def parser_tools(tools: tuple[Tool, ...]) -> list[dict[str, Any]] | None:
    """The tools for a parser, which reads their schemas to type the arguments (Qwen3-Coder's
    parameters are untyped text); a schema that is not a JSON object is left out."""
    return [template_tool(tool, loads_object(tool.parameters)) for tool in tools] or None


def loads_object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def parse_tool_calls(tokenizer, text: str, tools: list[dict] | None = None) -> tuple[ToolCall, ...]:
    """The complete tool calls in `text`, a model's output; `tokenizer` is the model's mlx-lm
    TokenizerWrapper. A call the parser cannot read stays in the text only: never raises."""
    if not tokenizer.has_tool_calling or tokenizer.tool_call_start not in text:
        return ()
    calls: list[ToolCall] = []
    for call_text in tool_call_texts(text, tokenizer.tool_call_start, tokenizer.tool_call_end):
        calls.extend(parsed_calls(tokenizer.tool_parser, call_text, tools))
    return tuple(calls)


def tool_call_texts(text: str, start: str, end: str) -> Iterator[str]:
    """The text between each start marker and its end marker. An unended call is incomplete;
    where the family has no end marker (Mistral) a call runs to the end of the text."""
    position = 0
    while (begin := text.find(start, position)) >= 0:
        begin += len(start)
        if not end:
            yield text[begin:]
            return
        finish = text.find(end, begin)
        if finish < 0:
            return
        yield text[begin:finish]
        position = finish + len(end)


def parsed_calls(parser, call_text: str, tools: list[dict] | None) -> list[ToolCall]:
    """The calls in one marked span (some families put several in one); none if any is
    malformed. The parsers are third-party code reading model output: any error means
    malformed."""
    try:
        parsed = parser(call_text, tools)
        entries = parsed if isinstance(parsed, list) else [parsed]
        return [tool_call(entry) for entry in entries]
    except Exception as exc:
        log.debug("a tool call was not parsed (%s: %s)", type(exc).__name__, exc)
        return []


def tool_call(entry: dict) -> ToolCall:
    """A parser's {"name", "arguments"[, "id"]}, its arguments as JSON text as mlx_lm.server
    writes them."""
    name = entry["name"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"a tool call named {name!r}")
    call_id = entry.get("id")
    if not isinstance(call_id, str) or not call_id:
        call_id = "call_" + secrets.token_hex(12)
    arguments = json.dumps(entry.get("arguments", {}), ensure_ascii=False)
    return ToolCall(call_id, name, arguments)
