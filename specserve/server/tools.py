"""OpenAI tool calling for Hermes-style chat templates (Qwen2.5): checks of the request's
`tools`, `tool_choice` and `parallel_tool_calls`, and the messages and `tools` variable the
chat template renders. `tool_parser` reads the calls back out of the generated text and
`tool_grammar` builds the grammar that enforces `tool_choice` "required" or a named function.

The model is shown the tools inside `<tools></tools>` by its own chat template and answers a
call as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call.
Pure functions, no HTTP: the server maps `ToolError` to a 400 naming `ToolError.param`.

Example::

    >>> request = validate_tool_request(
    ...     [{"type": "function", "function": {"name": "get_weather"}}], "required", None)
    >>> request.choice, request.parallel
    (ToolChoice(mode='required', name=None), True)
    >>> request.template_tools
    [{'type': 'function', 'function': {'name': 'get_weather'}}]
    >>> validate_tool_request([{"type": "function", "function": {"name": "f"}}],
    ...                       {"type": "function", "function": {"name": "x"}}, None)
    Traceback (most recent call last):
    ...
    specserve.server.tools.ToolError: tool_choice names function 'x', which is not in tools
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import jinja2
from jinja2 import meta
from jinja2.ext import loopcontrols

# The tags around one call, as Qwen2.5 / Hermes templates write them.
OPEN_TAG, CLOSE_TAG = "<tool_call>", "</tool_call>"
# OpenAI's rule for function names.
NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


class ToolError(ValueError):
    """A `tools`, `tool_choice`, `parallel_tool_calls` or tool message the server refuses;
    `param` names the request field (OpenAI's error `param`)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class FunctionTool:
    """One `{"type": "function", "function": {...}}` entry of `tools`, checked."""

    name: str
    description: str | None = None
    parameters: Mapping[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None

    def template_form(self) -> dict[str, Any]:
        """The tool as chat templates take it (what transformers passes): OpenAI's shape."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        if self.parameters is not None:
            function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolChoice:
    """`mode` "auto", "none", "required", or "function" with the forced function's `name`."""

    mode: Literal["auto", "none", "required", "function"]
    name: str | None = None


_PLAIN_CHOICES = {mode: ToolChoice(mode) for mode in ("auto", "none", "required")}


@dataclass(frozen=True)
class ToolRequest:
    """The checked tool fields of one chat completion request."""

    tools: tuple[FunctionTool, ...]
    choice: ToolChoice
    parallel: bool

    @property
    def template_tools(self) -> list[dict[str, Any]] | None:
        """The template's `tools` variable; None for tool_choice "none" (OpenAI: the model
        will not call a tool, so it is not shown any)."""
        if self.choice.mode == "none":
            return None
        return [tool.template_form() for tool in self.tools]


# -- request checks ---------------------------------------------------------------------------


def validate_tool_request(
    tools: Any, tool_choice: Any, parallel_tool_calls: Any
) -> ToolRequest | None:
    """Check OpenAI's three tool fields as they came in the JSON body; None without tools.

    Raises ToolError naming the field, e.g. ``tool_choice names function 'x', which is not
    in tools``.
    """
    if tools is None:
        for param, value in (
            ("tool_choice", tool_choice),
            ("parallel_tool_calls", parallel_tool_calls),
        ):
            if value is not None:
                raise ToolError(f"'{param}' is only allowed when 'tools' are specified", param)
        return None
    if not isinstance(tools, list) or not tools:
        raise ToolError("'tools' must be a non-empty array of function tools", "tools")
    checked = tuple(_check_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools))
    names = [tool.name for tool in checked]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise ToolError(f"tools[{index}]: function name '{name}' is given twice", "tools")
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise ToolError("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    choice = _check_choice(tool_choice, names)
    return ToolRequest(checked, choice, parallel_tool_calls is not False)


def _check_tool(tool: Any, where: str) -> FunctionTool:
    if not isinstance(tool, Mapping):
        raise ToolError(f"{where} must be an object", "tools")
    if tool.get("type") != "function":
        raise ToolError(f"{where}.type must be 'function', got {tool.get('type')!r}", "tools")
    function = tool.get("function")
    if not isinstance(function, Mapping):
        raise ToolError(f"{where}.function must be an object", "tools")
    name = _check_name(function.get("name"), f"{where}.function.name", "tools")
    description, parameters = function.get("description"), function.get("parameters")
    strict = function.get("strict")
    if description is not None and not isinstance(description, str):
        raise ToolError(f"{where}.function.description must be a string", "tools")
    if parameters is not None:
        if not isinstance(parameters, Mapping):
            raise ToolError(f"{where}.function.parameters must be a JSON schema object", "tools")
        if parameters.get("type", "object") != "object":
            raise ToolError(
                f"{where}.function.parameters must describe an object (type 'object'), "
                f"got type {parameters.get('type')!r}",
                "tools",
            )
    if strict is not None and not isinstance(strict, bool):
        raise ToolError(f"{where}.function.strict must be a boolean", "tools")
    return FunctionTool(name, description, parameters, strict)


def _check_name(name: Any, where: str, param: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ToolError(
            f"{where} must be 1-64 characters of a-z, A-Z, 0-9, '_' or '-', got {name!r}", param
        )
    return name


def _check_choice(tool_choice: Any, names: Sequence[str]) -> ToolChoice:
    if tool_choice is None:
        return ToolChoice("auto")
    if isinstance(tool_choice, str):
        if tool_choice in _PLAIN_CHOICES:
            return _PLAIN_CHOICES[tool_choice]
    elif isinstance(tool_choice, Mapping) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        name = _check_name(name, "tool_choice.function.name", "tool_choice")
        if name not in names:
            raise ToolError(
                f"tool_choice names function '{name}', which is not in tools", "tool_choice"
            )
        return ToolChoice("function", name)
    raise ToolError(
        '\'tool_choice\' must be "auto", "none", "required" or '
        f'{{"type": "function", "function": {{"name": ...}}}}, got {tool_choice!r}',
        "tool_choice",
    )


@lru_cache(maxsize=16)
def template_supports_tools(template: str) -> bool:
    """Whether a chat template reads the `tools` variable (it can show the model tools).

    >>> template_supports_tools("{% if tools %}{{ tools | tojson }}{% endif %}")
    True
    >>> template_supports_tools("{% for m in messages %}{{ m.content }}{% endfor %}")
    False
    """
    try:
        parsed = jinja2.Environment(extensions=[loopcontrols]).parse(template)
    except jinja2.TemplateSyntaxError:
        return False
    return "tools" in meta.find_undeclared_variables(parsed)


# -- messages ---------------------------------------------------------------------------------


def template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI chat messages -> what Hermes-style templates (and transformers) expect.

    - `content` None or a list of text parts becomes one string ("" when absent).
    - An assistant's `tool_calls` keep OpenAI's shape but `arguments` becomes the parsed
      object: Qwen's template writes `tool_call.arguments | tojson`, so a JSON string
      would come out quoted a second time.
    - A `tool` message keeps `tool_call_id` and gains the called function's `name`.
    - `developer` becomes `system` (templates know only the latter; Qwen's drops
      messages with roles it does not know).
    """
    called: dict[str, str] = {}  # tool call id -> function name, from earlier messages
    converted = []
    for index, message in enumerate(messages):
        role = message.get("role")
        out: dict[str, Any] = {
            "role": "system" if role == "developer" else role,
            "content": _text(message.get("content"), f"messages[{index}].content"),
        }
        tool_calls = message.get("tool_calls")
        if role == "assistant" and tool_calls:
            out["tool_calls"] = _template_calls(tool_calls, f"messages[{index}].tool_calls")
            called.update((c["id"], c["function"]["name"]) for c in out["tool_calls"])
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in called:
                raise ToolError(
                    f"messages[{index}].tool_call_id {call_id!r} does not answer a tool call "
                    "of an earlier assistant message",
                    "messages",
                )
            out["tool_call_id"], out["name"] = call_id, called[call_id]
        converted.append(out)
    return converted


def _text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(part["text"] for part in content)
    raise ToolError(f"{where} must be a string or a list of text parts", "messages")


def _template_calls(tool_calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(tool_calls, list):
        raise ToolError(f"{where} must be an array", "messages")
    converted = []
    for index, call in enumerate(tool_calls):
        here = f"{where}[{index}]"
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(call.get("id"), str):
            raise ToolError(
                f"{here} must be {{id, type, function: {{name, arguments}}}}", "messages"
            )
        name = _check_name(function.get("name"), f"{here}.function.name", "messages")
        arguments = function.get("arguments", "{}")
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError as exc:
            raise ToolError(
                f"{here}.function.arguments is not valid JSON: {exc}", "messages"
            ) from None
        converted.append(
            {"id": call["id"], "type": "function", "function": {"name": name, "arguments": parsed}}
        )
    return converted
