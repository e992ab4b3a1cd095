"""Grammars (llguidance's Lark syntax) that make the model call a tool when the request
says it must: tool_choice "required" (one or more calls, one without parallel tool calls)
or a named function (exactly one call of it). "auto" and "none" are not constrained.

Each call is `<tool_call>\\n` + a JSON object + `\\n</tool_call>`, calls separated by one
newline, as the model's template renders past calls. The object is an embedded `%json`
schema per function: `name` fixed to the function, then `arguments` under its parameters
schema. llguidance keeps the properties in schema order, so the model writes "name" first
as it was trained to; JSON whitespace stays free (`{"a": 1}` as the model spaces it).

Example::

    >>> print(tool_call_grammar([FunctionTool("f")], ToolChoice("required"), parallel=False))
    start: call
    call: <tool_call> "\\n" body "\\n" </tool_call>
    body: fn_0
    fn_0: %json {"x-guidance": {"lenient": true}, "type": "object", "properties": \
{"name": {"const": "f"}, "arguments": {"type": "object", "properties": {}, \
"additionalProperties": false}}, "required": ["name", "arguments"], "additionalProperties": false}
    <BLANKLINE>
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from specserve.server.tools import CLOSE_TAG, OPEN_TAG, FunctionTool, ToolChoice, ToolError

# Where a function's parameters schema sits inside the schema of its whole call, for
# rewriting the parameters' own local `$ref`s ("#/$defs/x").
ARGUMENTS_POINTER = "#/properties/arguments"
# Keywords whose values are data, not schemas: a "$ref" key inside them is not a reference.
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})
# A function without `parameters` takes none (OpenAI): its arguments are `{}`.
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def tool_call_grammar(
    tools: Sequence[FunctionTool],
    tool_choice: ToolChoice,
    parallel: bool,
    *,
    tag_tokens: bool = True,
) -> str | None:
    """The Lark grammar that enforces `tool_choice`, or None when nothing is enforced.

    `tag_tokens`: `<tool_call>` and `</tool_call>` are single tokens of the vocabulary (Qwen2.5:
    ids 151657 and 151658). llguidance counts such added tokens as special and matches them
    only by token (`<tool_call>` in the grammar), never as the text "<tool_call>"; with False
    the tags are plain text, for vocabularies without them.
    """
    if tool_choice.mode in ("auto", "none"):
        return None
    chosen = [t for t in tools if tool_choice.mode == "required" or t.name == tool_choice.name]
    open_tag, close_tag = (
        (OPEN_TAG, CLOSE_TAG) if tag_tokens else (json.dumps(OPEN_TAG), json.dumps(CLOSE_TAG))
    )
    repeat = parallel and tool_choice.mode == "required"
    lines = [
        'start: call ("\\n" call)*' if repeat else "start: call",
        f'call: {open_tag} "\\n" body "\\n" {close_tag}',
        "body: " + " | ".join(f"fn_{i}" for i in range(len(chosen))),
    ]
    lines += [f"fn_{i}: %json {json.dumps(call_schema(t))}" for i, t in enumerate(chosen)]
    return "\n".join(lines) + "\n"


def call_schema(tool: FunctionTool) -> dict[str, Any]:
    """JSON schema of `{"name": <tool.name>, "arguments": <its parameters>}`.

    Lenient: llguidance skips schema keywords and string formats it does not implement
    rather than failing the request (the constraint is then looser, never wrong).
    """
    parameters = dict(tool.parameters) if tool.parameters is not None else dict(NO_PARAMETERS)
    parameters.setdefault("type", "object")  # Qwen's format and OpenAI's both want an object
    return {
        "x-guidance": {"lenient": True},
        "type": "object",
        "properties": {
            "name": {"const": tool.name},
            "arguments": rebase_refs(parameters, ARGUMENTS_POINTER),
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def rebase_refs(schema: Any, base: str) -> Any:
    """A copy of `schema` whose local references ("#", "#/$defs/unit") point below `base`.

    >>> rebase_refs({"properties": {"u": {"$ref": "#/$defs/u"}}}, "#/properties/arguments")
    {'properties': {'u': {'$ref': '#/properties/arguments/$defs/u'}}}
    """
    if isinstance(schema, list):
        return [rebase_refs(item, base) for item in schema]
    if not isinstance(schema, Mapping):
        return schema
    rebased = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            rebased[key] = base + value[1:]
        elif key in _DATA_KEYWORDS:
            rebased[key] = value
        else:
            rebased[key] = rebase_refs(value, base)
    return rebased


def check_grammar(grammar: str, tokenizer: Any = None) -> None:
    """Raise ToolError (param "tools") when llguidance cannot compile `grammar`, e.g. a
    parameters schema it cannot enforce. `tokenizer` (an `llguidance.LLTokenizer`) also
    checks that the tag tokens exist; without it they are not checked."""
    import llguidance  # only servers that enforce tool_choice need it

    error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
    if error:
        raise ToolError(f"tools: cannot enforce tool_choice with these schemas: {error}", "tools")
