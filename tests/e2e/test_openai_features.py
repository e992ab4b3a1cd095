"""End to end with the official `openai` client: structured output, tools, logprobs, n,
penalties and logit_bias, each with and without speculation (the n-gram deployment "tiny"
against "tiny-plain") and with Predicted Outputs, streaming and not; and every bad input of
issue 13 answered with a 400 naming its parameter while the server keeps serving.

The model is tests/e2e/test_server.py's printable tiny model (its LM head picks only printable
ASCII byte tokens, so greedy text is stable and re-encodes to its ids). "tools" is the same
model with a Hermes-style chat template that renders tools; "tiny" keeps ChatML, which
cannot, so tools there are refused.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from specserve.deployments.rules import DrafterFlags
from specserve.deployments.service import create_deployment
from specserve.deployments.store import DeploymentStore
from specserve.model.loader import Model, load_model
from specserve.server.app import ServerSettings
from specserve.server.served import EngineOptions, load_deployments
from tests.server_harness import RunningServer, start_server
from tests.tiny import TinySpec, write_tiny_gguf
from tests.unit.test_tools import HERMES_TEMPLATE

OPTIONS = EngineOptions(max_batch=8, max_queue=16, max_context=1024)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "tag": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "ok", "tag"],
    "additionalProperties": False,
}
JSON_SCHEMA = {
    "type": "json_schema",
    "json_schema": {"name": "p", "schema": SCHEMA, "strict": True},
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 6},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
DEPLOYMENTS = ("tiny", "tiny-plain")


def _model(folder: Path, name: str, template: str | None = None) -> Model:
    model_spec = TinySpec(merges=False, printable_output=True, seed=3, context=1024)
    if template is not None:
        model_spec = TinySpec(
            merges=False, printable_output=True, seed=3, context=1024, chat_template=template
        )
    path = write_tiny_gguf(folder / f"{name}.gguf", model_spec)
    # bfloat16: its k-token forward is bit-identical to k single steps (float32's CPU GEMMs
    # are not, tests/engine/test_token_rules.py), so logprobs compare exactly.
    return load_model(str(path), dtype="bfloat16", progress=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("features")
    models = {
        m.path.name: m
        for m in (_model(folder, "chatml"), _model(folder, "hermes", HERMES_TEMPLATE))
    }
    store = DeploymentStore(folder / "deployments.db")
    for file, prefix in (("chatml.gguf", "tiny"), ("hermes.gguf", "tools")):
        path = str(folder / file)
        create_deployment(store, path, DrafterFlags(), id=prefix)  # default drafter: n-gram
        create_deployment(store, path, DrafterFlags(no_speculation=True), id=f"{prefix}-plain")
    served = load_deployments(store.list(), lambda name: models[Path(name).name], OPTIONS)
    for name in ("tiny", "tools"):  # fixed lengths: drafting (forced tokens included) is not
        speculation = served.by_id[
            name
        ].speculation  # left to the timing guard, which a loaded CI may veto
        served.by_id[name].speculation = dataclasses.replace(speculation, adaptive=False)
    running = start_server(served, ServerSettings())
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def _chat(client: openai.OpenAI, model: str = "tiny", content: str = "hi", **kw: Any) -> Any:
    kw.setdefault("temperature", 0)
    messages = [{"role": "user", "content": content}]
    return client.chat.completions.create(model=model, messages=messages, **kw)


def _streamed(client: openai.OpenAI, model: str = "tiny", **kw: Any) -> dict[int, dict[str, Any]]:
    """Per choice index: the content, tool calls, logprobs and finish of a streamed chat."""
    out: dict[int, dict[str, Any]] = {}
    for chunk in _chat(client, model, stream=True, **kw):
        for choice in chunk.choices:
            got = out.setdefault(
                choice.index, {"content": "", "calls": [], "logprobs": [], "finish": None}
            )
            got["content"] += choice.delta.content or ""
            got["calls"] += choice.delta.tool_calls or []
            if choice.logprobs is not None:
                got["logprobs"] += choice.logprobs.content
            got["finish"] = choice.finish_reason or got["finish"]
    return out


# -- structured output ---------------------------------------------------------------------------


def test_json_schema_is_valid_and_equal_with_and_without_speculation(
    client: openai.OpenAI,
) -> None:
    texts = set()
    for model in DEPLOYMENTS:
        reply = _chat(client, model, max_tokens=80, response_format=JSON_SCHEMA)
        text = reply.choices[0].message.content
        jsonschema.validate(json.loads(text), SCHEMA)
        assert reply.choices[0].finish_reason == "stop"
        texts.add(text)
        streamed = _streamed(client, model, max_tokens=80, response_format=JSON_SCHEMA)
        assert streamed[0]["content"] == text and streamed[0]["finish"] == "stop"
        forced = reply.usage.model_extra["speculation"]["forced_tokens"]
        assert forced > 0 if model == "tiny" else forced == 0  # free drafts are speculation
    assert len(texts) == 1  # greedy under a grammar: identical with and without speculation
    (text,) = texts
    for prediction in (text, text[:12] + "zzz" + text[15:], "no json at all"):
        reply = _chat(
            client, "tiny", max_tokens=80, response_format=JSON_SCHEMA, prediction=_p(prediction)
        )
        assert reply.choices[0].message.content == text


def _p(text: str) -> dict[str, str]:
    return {"type": "content", "content": text}


def test_json_object_and_sampled_json_are_valid(client: openai.OpenAI) -> None:
    for model in DEPLOYMENTS:
        reply = _chat(client, model, max_tokens=100, response_format={"type": "json_object"})
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    for seed in range(3):  # sampled: every choice valid too
        reply = _chat(
            client,
            "tiny",
            max_tokens=80,
            response_format=JSON_SCHEMA,
            temperature=1.0,
            seed=seed,
            n=2,
        )
        for choice in reply.choices:
            jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    done = client.completions.create(
        model="tiny",
        prompt="{",
        max_tokens=80,
        temperature=0,
        extra_body={"response_format": JSON_SCHEMA},
    )
    jsonschema.validate(json.loads(done.choices[0].text), SCHEMA)


# -- tools ---------------------------------------------------------------------------------------


def _call_shape(call: Any) -> tuple[str, dict[str, Any]]:
    return call.function.name, json.loads(call.function.arguments)


@pytest.mark.parametrize(
    "choice",
    ["required", {"type": "function", "function": {"name": "get_weather"}}],
    ids=["required", "named"],
)
def test_forced_tool_calls_are_parsed_streamed_and_lossless(
    client: openai.OpenAI, choice: Any
) -> None:
    shapes = set()
    for model in ("tools", "tools-plain"):
        kw = {"tools": [WEATHER, TIME], "tool_choice": choice, "parallel_tool_calls": False}
        reply = _chat(client, model, "weather in Paris?", max_tokens=120, **kw)
        message = reply.choices[0].message
        assert reply.choices[0].finish_reason == "tool_calls"
        assert message.content is None and len(message.tool_calls) == 1
        call = message.tool_calls[0]
        assert call.id.startswith("call_") and call.type == "function"
        name, arguments = _call_shape(call)
        if name == "get_weather":
            jsonschema.validate(arguments, WEATHER["function"]["parameters"])  # type: ignore[index]
        else:
            assert name == "get_time" and arguments == {}
        shapes.add(json.dumps([name, arguments]))
        streamed = _streamed(client, model, content="weather in Paris?", max_tokens=120, **kw)[0]
        assert streamed["finish"] == "tool_calls" and streamed["content"] == ""
        header, body = streamed["calls"]
        assert header.function.name == name and header.id.startswith("call_")
        assert json.loads(body.function.arguments) == arguments
    assert len(shapes) == 1  # the same call with and without speculation


def test_auto_tool_choice_and_tool_results_round_trip(client: openai.OpenAI) -> None:
    reply = _chat(client, "tools", max_tokens=12, tools=[WEATHER])  # auto: not constrained
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].message.content
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Oslo", "unit": "c"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "12 degrees"},
    ]
    reply = client.chat.completions.create(
        model="tools", messages=messages, tools=[WEATHER], max_tokens=8, temperature=0
    )
    assert reply.usage.prompt_tokens > 40  # the tools and the tool's answer went in
    # tool_choice "none" shows no tools, so ChatML serves it.
    reply = _chat(client, "tiny", max_tokens=4, tools=[WEATHER], tool_choice="none")
    assert reply.choices[0].message.content and reply.choices[0].message.tool_calls is None
    # ... and its response_format still holds (one grammar a request: no call is forced).
    reply = _chat(
        client, "tiny", max_tokens=80, tools=[WEATHER], tool_choice="none",
        response_format=JSON_SCHEMA,
    )  # fmt: skip
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)


# -- logprobs ------------------------------------------------------------------------------------


def _logprob_rows(content: list[Any]) -> list[Any]:
    return [
        (e.token, e.logprob, e.bytes, [(t.token, t.logprob, t.bytes) for t in e.top_logprobs])
        for e in content
    ]


def test_chat_logprobs_equal_plain_and_streamed(client: openai.OpenAI) -> None:
    rows = []
    for model in DEPLOYMENTS:
        for extra in ({}, {"response_format": JSON_SCHEMA}, {"prediction": _p("ZR7b--Rw }")}):
            reply = _chat(client, model, max_tokens=24, logprobs=True, top_logprobs=3, **extra)
            content = reply.choices[0].logprobs.content
            assert len(content) == reply.usage.completion_tokens
            assert "".join(e.token for e in content) == reply.choices[0].message.content
            for entry in content:
                # Tokens the grammar forbids (-inf) are no alternatives: fewer where it forces.
                assert 1 <= len(entry.top_logprobs) <= 3 and entry.bytes == list(
                    entry.token.encode()
                )
                assert len(entry.top_logprobs) == 3 or "response_format" in extra
                assert entry.logprob <= entry.top_logprobs[0].logprob + 1e-6 <= 1e-6
            streamed = _streamed(
                client, model, max_tokens=24, logprobs=True, top_logprobs=3, **extra
            )
            assert _logprob_rows(streamed[0]["logprobs"]) == _logprob_rows(content)
            rows.append((json.dumps(extra), _logprob_rows(content)))
    plain = {key: value for key, value in rows[3:]}
    assert {key: value for key, value in rows[:3]} == plain  # speculation changes nothing


def test_completions_logprobs(client: openai.OpenAI) -> None:
    answers = [
        client.completions.create(
            model=m, prompt="the cat", max_tokens=10, temperature=0, logprobs=2
        )
        for m in DEPLOYMENTS
    ]
    assert answers[0].choices[0].logprobs == answers[1].choices[0].logprobs
    choice = answers[0].choices[0]
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text and len(logprobs.tokens) == 10
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(10)]
    for token, logprob, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert 2 <= len(top) <= 3 and top[token] == logprob


# -- n -------------------------------------------------------------------------------------------


def test_n_choices_are_independent_and_seeded(client: openai.OpenAI) -> None:
    def texts(model: str = "tiny-plain", **kw: Any) -> list[str]:
        reply = _chat(client, model, max_tokens=16, temperature=1.0, **kw)
        assert [c.index for c in reply.choices] == list(range(len(reply.choices)))
        return [c.message.content for c in reply.choices]

    first = texts(n=3, seed=5)
    assert len(set(first)) > 1 and len(set(texts("tiny", n=3, seed=5))) > 1  # independent
    # Seeded sampling is bit-reproducible without speculation (with it, which random
    # numbers a position draws depends on the self-tuned draft lengths: docs/serving.md).
    assert texts(n=3, seed=5) == first  # the seed reproduces every choice
    assert texts(n=1, seed=5) == first[:1]  # choice 0 is the request's seed itself
    assert texts(n=3, seed=6) != first
    streamed = _streamed(client, "tiny-plain", max_tokens=16, temperature=1.0, n=3, seed=5)
    assert [streamed[i]["content"] for i in range(3)] == first
    reply = _chat(client, "tiny", max_tokens=16, temperature=1.0, n=3, seed=5)
    assert reply.usage.completion_tokens == 48
    done = client.completions.create(model="tiny-plain", prompt="a", max_tokens=6, n=2, seed=1)
    assert [c.index for c in done.choices] == [0, 1] and done.usage.completion_tokens == 12


def test_a_shared_prompt_start_is_reported_as_cached_tokens(
    server: RunningServer, client: openai.OpenAI
) -> None:
    """The prefix cache (on by default, model/prefix_cache.py): a request that opens like
    an earlier one reports the reused positions in ``usage.prompt_tokens_details`` and in
    the ``specserve_prompt_tokens_cached`` counter."""
    system = {"role": "system", "content": "You rewrite code. Keep every unchanged line. " * 3}

    def chat(content: str) -> Any:
        messages = [system, {"role": "user", "content": content}]
        return client.chat.completions.create(
            model="tiny-plain", messages=messages, max_tokens=12, temperature=0
        )

    chat("first file")
    second = chat("second file")
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert len(system["content"]) < cached < second.usage.prompt_tokens  # a byte a token
    again = chat("second file")
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    assert again.choices[0].message.content == second.choices[0].message.content
    metrics = httpx.get(server.base_url + "/metrics").text
    line = 'specserve_prompt_tokens_cached_total{deployment="tiny-plain"} '
    counted = float(metrics.split(line)[1].split()[0])
    assert counted >= cached + again.usage.prompt_tokens_details.cached_tokens
    held = metrics.split("specserve_prefix_cache_bytes{")[1].split("\n")[0]
    assert float(held.split()[-1]) > 0


# -- penalties and logit_bias ----------------------------------------------------------------------


def test_penalties_and_logit_bias(client: openai.OpenAI) -> None:
    plain = _chat(client, "tiny", max_tokens=24).choices[0].message.content
    penalized = {
        _chat(client, m, max_tokens=24, presence_penalty=1.5, frequency_penalty=2.0)
        .choices[0]
        .message.content
        for m in DEPLOYMENTS
    }
    assert len(penalized) == 1 and penalized != {plain}
    a_id = ord("A") - ord("!")  # byte-level vocabulary: "!" is id 0
    biased = _chat(client, "tiny", max_tokens=6, logit_bias={str(a_id): 100})
    assert biased.choices[0].message.content == "AAAAAA"
    banned = _chat(client, "tiny", max_tokens=24, logit_bias={str(ord(plain[0]) - ord("!")): -100})
    assert banned.choices[0].message.content[0] != plain[0]


# -- bad input -----------------------------------------------------------------------------------

BAD_SCHEMA = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}


IMAGE_PART = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}


@pytest.mark.parametrize(
    ("model", "extra", "param"),
    [
        ("tiny", {"response_format": BAD_SCHEMA}, "response_format"),
        ("tiny", {"response_format": {"type": "json_schema"}}, "response_format"),
        ("tiny", {"response_format": {"type": "xml"}}, "response_format.type"),
        (
            "tools",
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ("tiny", {"tools": [WEATHER]}, "tools"),
        (
            "tools",
            {"tools": [WEATHER], "response_format": {"type": "json_object"}},
            "response_format",
        ),
        ("tiny", {"functions": [{"name": "f"}]}, "functions"),
        ("tiny", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("tiny", {"top_logprobs": 2}, "top_logprobs"),
        ("tiny", {"n": 9}, "n"),
        ("tiny", {"presence_penalty": 2.5}, "presence_penalty"),
        ("tiny", {"frequency_penalty": -3}, "frequency_penalty"),
        ("tiny", {"logit_bias": {"abc": 1}}, "logit_bias.abc"),
        ("tiny", {"logit_bias": {"5": 101}}, "logit_bias.5"),
        ("tiny", {"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ("tiny", {"logit_bias": {"100000": 1}}, "logit_bias"),
        ("tiny", {"n": 2, "prediction": {"type": "content", "content": "x"}}, "n"),
        # an image part: named at its type, not as "content should be a valid string"
        (
            "tiny",
            {"messages": [{"role": "user", "content": [IMAGE_PART]}]},
            "messages.0.content.0.type",
        ),
    ],
)
def test_bad_input_is_a_400_naming_the_parameter(
    server: RunningServer, client: openai.OpenAI, model: str, extra: dict[str, Any], param: str
) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        **extra,
    }
    response = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert "Traceback" not in response.text
    assert _chat(client, model, max_tokens=2).usage.completion_tokens == 2  # still serving


def test_completions_bad_input(server: RunningServer) -> None:
    url = server.base_url + "/v1/completions"
    for extra, param in (
        ({"logprobs": 6}, "logprobs"),
        ({"response_format": BAD_SCHEMA}, "response_format"),
    ):
        response = httpx.post(url, json={"model": "tiny", "prompt": "a", **extra}, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == param
