"""OpenAI tool calling: request checks, template rendering (a handwritten Hermes template,
and Qwen2.5-Coder's own when its GGUF is present), parsing the calls out of the text, the
stream against the whole parse at every split (the grammars: test_tool_grammar.py)."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models

from specserve.model.catalog import QWEN_CODER_0_5B
from specserve.model.chat_template import CHATML_TEMPLATE, GEMMA_TEMPLATE, render_chat_template
from specserve.model.tokenizer import Tokenizer
from specserve.server.tool_parser import (
    ToolCallStream,
    new_call_id,
    parse_call,
    parse_tool_calls,
    tool_finish_reason,
)
from specserve.server.tools import (
    ToolChoice,
    ToolError,
    template_messages,
    template_supports_tools,
    validate_tool_request,
)
from tests.unit.tool_samples import BERGEN, OSLO, TIME, WEATHER, qwen_metadata

# A conversation with one round of two parallel calls, as an OpenAI client sends it back.
CONVERSATION = [
    {"role": "user", "content": "Weather in Oslo and Bergen?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_a", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
            {"id": "call_b", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Bergen"}'}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_a", "content": "-3 C"},
    {"role": "tool", "tool_call_id": "call_b", "content": "2 C"},
]  # fmt: skip

# What Hermes-style templates do with tools, in a dozen lines (CI has no Qwen GGUF).
HERMES_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content }}"
    "{{- '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content }}"
    "{%- for call in message.tool_calls or [] %}"
    '{{- \'<tool_call>\\n{"name": "\' + call.function.name + \'", "arguments": \' }}'
    "{{- call.function.arguments | tojson + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def counter_ids() -> Callable[[], str]:
    """Deterministic call ids, so a stream and a whole parse can be compared."""
    numbers = itertools.count()
    return lambda: f"call_{next(numbers)}"


# -- request checks ---------------------------------------------------------------------------


def test_a_request_without_tools_is_none_and_tool_fields_need_tools() -> None:
    assert validate_tool_request(None, None, None) is None
    for choice, parallel, param in [
        ("auto", None, "tool_choice"),
        (None, True, "parallel_tool_calls"),
    ]:
        with pytest.raises(ToolError, match="only allowed when 'tools'") as caught:
            validate_tool_request(None, choice, parallel)
        assert caught.value.param == param


def test_defaults_and_choices() -> None:
    request = validate_tool_request([WEATHER, TIME], None, None)
    assert request is not None
    assert request.choice == ToolChoice("auto") and request.parallel
    assert [t.name for t in request.tools] == ["get_weather", "get_time"]
    assert request.template_tools == [WEATHER, TIME]
    named = {"type": "function", "function": {"name": "get_time"}}
    request = validate_tool_request([WEATHER, TIME], named, False)
    assert request is not None
    assert request.choice == ToolChoice("function", "get_time") and not request.parallel
    none = validate_tool_request([WEATHER], "none", None)
    assert none is not None and none.template_tools is None  # "none": the model sees no tools


@pytest.mark.parametrize(
    ("tools", "choice", "parallel", "message", "param"),
    [
        ([], None, None, "non-empty array", "tools"),
        ({"type": "function"}, None, None, "non-empty array", "tools"),
        ([{"type": "code_interpreter"}], None, None, r"tools\[0\].type must be 'function'",
         "tools"),
        ([{"type": "function"}], None, None, r"tools\[0\].function must be an object", "tools"),
        ([{"type": "function", "function": {"name": "get weather"}}], None, None,
         r"tools\[0\].function.name must be 1-64 characters", "tools"),
        ([{"type": "function", "function": {"name": "f" * 65}}], None, None,
         "1-64 characters", "tools"),
        ([TIME, WEATHER, TIME], None, None, r"tools\[2\]: function name 'get_time' is given twice",
         "tools"),
        ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], None, None,
         "parameters must be a JSON schema object", "tools"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
         None, None, "must describe an object", "tools"),
        ([{"type": "function", "function": {"name": "f", "description": 3}}], None, None,
         "description must be a string", "tools"),
        ([{"type": "function", "function": {"name": "f", "strict": "yes"}}], None, None,
         "strict must be a boolean", "tools"),
        ([TIME], "always", None, "'tool_choice' must be \"auto\"", "tool_choice"),
        ([TIME], {"type": "function", "function": {"name": "get_weather"}}, None,
         "tool_choice names function 'get_weather', which is not in tools", "tool_choice"),
        ([TIME], {"type": "function"}, None, "tool_choice.function.name", "tool_choice"),
        ([TIME], "auto", "yes", "'parallel_tool_calls' must be a boolean", "parallel_tool_calls"),
    ],
)  # fmt: skip
def test_invalid_requests_name_the_field(
    tools: Any, choice: Any, parallel: Any, message: str, param: str
) -> None:
    with pytest.raises(ToolError, match=message) as caught:
        validate_tool_request(tools, choice, parallel)
    assert caught.value.param == param


# -- templates and messages -------------------------------------------------------------------


def test_template_supports_tools_when_it_reads_the_variable() -> None:
    assert template_supports_tools(HERMES_TEMPLATE)
    assert not template_supports_tools(CHATML_TEMPLATE)
    assert not template_supports_tools(GEMMA_TEMPLATE)
    assert not template_supports_tools("{# tools #}{{ messages }}")  # a comment is no use
    assert not template_supports_tools("{% if %}")  # a broken template renders nothing


def test_messages_become_what_the_template_expects() -> None:
    messages = template_messages(
        [{"role": "developer", "content": [{"type": "text", "text": "Be "},
                                           {"type": "text", "text": "brief."}]}, *CONVERSATION]
    )  # fmt: skip
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assistant = messages[2]
    assert assistant["content"] == ""
    assert assistant["tool_calls"][0] == {
        "id": "call_a",
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},  # an object now
    }
    assert messages[4] == {
        "role": "tool", "content": "2 C", "tool_call_id": "call_b", "name": "get_weather",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]},
         r"messages\[0\].tool_calls\[0\].function.arguments is not valid JSON"),
        ({"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]},
         r"messages\[0\].tool_calls\[0\] must be"),
        ({"role": "tool", "tool_call_id": "nope", "content": "x"},
         r"messages\[0\].tool_call_id 'nope' does not answer a tool call"),
        ({"role": "user", "content": [{"type": "image_url"}]},
         r"messages\[0\].content must be a string or a list of text parts"),
    ],
)  # fmt: skip
def test_bad_tool_messages_are_refused(message: dict[str, Any], error: str) -> None:
    with pytest.raises(ToolError, match=error):
        template_messages([message])


def hermes_tokenizer() -> Tokenizer:
    """A tokenizer that carries the handwritten template (its vocabulary does not matter)."""
    backend = Backend(models.BPE({"<s>": 0, "</s>": 1}, []))
    return Tokenizer(
        backend, vocab_size=2, bos_id=0, eos_ids=[1], add_bos=False, chat_template=HERMES_TEMPLATE
    )


def test_hermes_template_renders_tools_calls_and_responses() -> None:
    request = validate_tool_request([TIME], None, None)
    assert request is not None
    text = hermes_tokenizer().apply_chat_template(
        template_messages(CONVERSATION[:3]), tools=request.template_tools
    )
    assert text == (
        "<|im_start|>system\n# Tools\n<tools>\n"
        '{"type": "function", "function": {"name": "get_time"}}\n</tools><|im_end|>\n'
        "<|im_start|>user\nWeather in Oslo and Bergen?<|im_end|>\n"
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bergen"}}\n</tool_call>'
        "<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n-3 C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    plain = hermes_tokenizer().apply_chat_template(CONVERSATION[:1])  # tools=None: no block
    assert (
        plain == "<|im_start|>user\nWeather in Oslo and Bergen?<|im_end|>\n<|im_start|>assistant\n"
    )


# Qwen's template shows the call format inside a Python-style string; the 1.5B GGUF's copy
# escapes the braces as "{{...}}", which reaches the prompt as is (the 0.5B's does not).
QWEN_SYSTEM = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + json.dumps(WEATHER)
    + "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    'OPEN"name": <function-name>, "arguments": <args-json-object>CLOSE\n</tool_call>'
    "<|im_end|>\n"
)
QWEN_TURNS = (
    "<|im_start|>user\nWeather in Oslo and Bergen?<|im_end|>\n"
    "<|im_start|>assistant\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bergen"}}\n</tool_call>'
    "<|im_end|>\n"
    "<|im_start|>user\n<tool_response>\n-3 C\n</tool_response>\n"
    "<tool_response>\n2 C\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n"
)


def test_qwen_template_renders_the_conversation(qwen_tokenizer: Tokenizer) -> None:
    template = qwen_tokenizer.chat_template
    assert template is not None and template_supports_tools(template)
    request = validate_tool_request([WEATHER], None, None)
    assert request is not None
    messages = template_messages(CONVERSATION)
    text = qwen_tokenizer.apply_chat_template(messages, tools=request.template_tools)
    assert text == QWEN_SYSTEM.replace("OPEN", "{{").replace("CLOSE", "}}") + QWEN_TURNS
    # tool_choice "none": no tools block, the default system prompt, the same turns.
    none = validate_tool_request([WEATHER], "none", None)
    assert none is not None
    text = qwen_tokenizer.apply_chat_template(messages, tools=none.template_tools)
    default = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. "
    assert text == default + "You are a helpful assistant.<|im_end|>\n" + QWEN_TURNS


def test_qwen_drafter_template_writes_single_braces() -> None:
    template = qwen_metadata(QWEN_CODER_0_5B.filename)["tokenizer.chat_template"]
    request = validate_tool_request([WEATHER], None, None)
    assert request is not None
    text = render_chat_template(
        template, template_messages(CONVERSATION), tools=request.template_tools
    )
    assert text == QWEN_SYSTEM.replace("OPEN", "{").replace("CLOSE", "}") + QWEN_TURNS


# -- parsing ----------------------------------------------------------------------------------

MALFORMED = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"\n</tool_call>'


def test_parse_one_call() -> None:
    parsed = parse_tool_calls(OSLO, new_id=counter_ids())
    assert parsed.content is None
    assert parsed.tool_calls == [
        {"id": "call_0", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    ]  # fmt: skip


def test_parse_two_calls_and_parallel_off() -> None:
    text = OSLO + "\n" + BERGEN
    parsed = parse_tool_calls(text, new_id=counter_ids())
    assert parsed.content is None
    assert [c["id"] for c in parsed.tool_calls] == ["call_0", "call_1"]
    assert json.loads(parsed.tool_calls[1]["function"]["arguments"]) == {
        "city": "Bergen", "unit": "celsius",
    }  # fmt: skip
    single = parse_tool_calls(text, parallel=False, new_id=counter_ids())
    assert single.content is None and single.tool_calls == parsed.tool_calls[:1]


def test_text_around_calls_stays_content() -> None:
    parsed = parse_tool_calls("Let me look.\n" + OSLO + "\nDone.\n", new_id=counter_ids())
    assert parsed.content == "Let me look.\nDone.\n"  # only the newline before the call goes
    assert len(parsed.tool_calls) == 1
    assert parse_tool_calls("Just text.\n").content == "Just text.\n"
    assert parse_tool_calls("").content == ""  # no calls: content is a string


def test_malformed_calls_stay_content_word_for_word() -> None:
    for text in [
        MALFORMED,
        "Hm.\n" + MALFORMED + "\n",
        OSLO[:-3],
        "<tool_call>\n[1, 2]\n</tool_call>",
    ]:
        parsed = parse_tool_calls(text)
        assert parsed.content == text and parsed.tool_calls == []
    parsed = parse_tool_calls(MALFORMED + "\n" + OSLO, new_id=counter_ids())
    assert parsed.content == MALFORMED and len(parsed.tool_calls) == 1


def test_parse_call_accepts_what_qwen_models_write() -> None:
    assert parse_call('{"name": "f", "arguments": {"x": 1}}') == ("f", '{"x": 1}')
    assert parse_call('\n{{"name": "f", "arguments": {"x": 1}}}\n') == ("f", '{"x": 1}')
    assert parse_call('{"name": "f", "arguments": "{\\"x\\": 1}"}') == ("f", '{"x": 1}')
    assert parse_call('{"name": "f"}') == ("f", "{}")
    assert parse_call('{"name": "ö", "arguments": {"s": "é"}}') == ("ö", '{"s": "é"}')
    for body in [
        '{"arguments": {}}',
        '{"name": "", "arguments": {}}',
        '{"name": "f", "arguments": 3}',
        "f(x)",
    ]:
        assert parse_call(body) is None


def test_call_ids_and_finish_reason() -> None:
    call_id = new_call_id()
    assert call_id.startswith("call_") and len(call_id) == 29 and call_id[5:].isalnum()
    assert call_id != new_call_id()
    assert tool_finish_reason(True, "stop") == "tool_calls"
    assert tool_finish_reason(True, "length") == "length"  # a cut-off answer says so
    assert tool_finish_reason(False, "stop") == "stop"


# -- streaming --------------------------------------------------------------------------------

STREAM_SAMPLES = [
    OSLO,
    "Let me look.\n" + OSLO + "\n" + BERGEN + "\n",
    "Sure <tool_ is not a tag, <tool_call is not either.\n\nBye  ",
    "Hm.\n" + MALFORMED + "\n" + OSLO + " and after",
    "  \n" + OSLO + "\n\n" + '<tool_call>\n{{"name": "get_time"}}\n</tool_call>\n \n',
    OSLO + "\n<tool_call>\n" + '{"name": "get_weather", "arguments": {"city": "Ber',  # cut off
]


def assemble(deltas: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """What an OpenAI client builds from the deltas: the content and the calls by index."""
    content, calls = "", []
    for delta in deltas:
        content += delta.get("content", "")
        for piece in delta.get("tool_calls", []):
            if "id" in piece:
                assert piece["index"] == len(calls) and piece["function"]["arguments"] == ""
                calls.append(
                    {
                        "id": piece["id"],
                        "type": piece["type"],
                        "function": {"name": piece["function"]["name"], "arguments": ""},
                    }
                )
            calls[piece["index"]]["function"]["arguments"] += piece["function"].get("arguments", "")
    return content, calls  # fmt: skip


def stream(pieces: Iterator[str] | list[str], parallel: bool) -> tuple[str, list[dict[str, Any]]]:
    parser = ToolCallStream(parallel=parallel, new_id=counter_ids())
    deltas = [d for piece in pieces for d in parser.feed(piece)] + parser.finish()
    content, calls = assemble(deltas)
    assert parser.called == bool(calls)
    return content, calls


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("text", STREAM_SAMPLES)
def test_stream_equals_the_whole_parse_at_every_split(text: str, parallel: bool) -> None:
    whole = parse_tool_calls(text, parallel=parallel, new_id=counter_ids())
    expected = (whole.content or "", whole.tool_calls)
    for cut in range(len(text) + 1):
        assert stream([text[:cut], text[cut:]], parallel) == expected, cut
    assert stream(list(text), parallel) == expected  # one character at a time
    rng = random.Random(0)
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(text) + 1), 4))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert stream(pieces, parallel) == expected, cuts


def test_stream_holds_back_only_what_may_start_a_call() -> None:
    parser = ToolCallStream(new_id=counter_ids())
    assert parser.feed("Let me look.\n<tool") == [{"content": "Let me look."}]
    assert parser.feed("_call>\n") == []
    assert parser.feed('{"name": "get_time"}\n</tool_call>') == [
        {"tool_calls": [{"index": 0, "id": "call_0", "type": "function",
                         "function": {"name": "get_time", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]},
    ]  # fmt: skip
    assert parser.feed("\n") == [] and parser.finish() == [] and parser.called
    plain = ToolCallStream()
    assert plain.feed("a <to") == [{"content": "a"}] and plain.feed("ol>") == [
        {"content": " <tool>"}
    ]
