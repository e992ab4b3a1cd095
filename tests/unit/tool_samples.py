"""Tool-calling samples shared by test_tools.py and test_tool_grammar.py: a function with a
schema, one without, the text a model writes for a call, and Qwen2.5-Coder's GGUF metadata
(tests/unit/conftest.py makes its tokenizer a fixture)."""

from __future__ import annotations

from typing import Any

import pytest

from specserve.model.fetch import models_dir
from specserve.model.gguf_file import GGUFFile

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"$ref": "#/$defs/unit"}},
            "required": ["city"],
            "$defs": {"unit": {"enum": ["celsius", "fahrenheit"]}},
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters: takes none


def call_text(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


OSLO = call_text("get_weather", '{"city": "Oslo"}')
BERGEN = call_text("get_weather", '{"city": "Bergen", "unit": "celsius"}')


def qwen_metadata(filename: str) -> dict[str, Any]:
    path = models_dir() / filename
    if not path.is_file():
        pytest.skip(f"{path} is not downloaded")
    return GGUFFile(path).metadata
