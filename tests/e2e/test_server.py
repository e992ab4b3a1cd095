"""End to end: the real server (uvicorn on a free port) and the official `openai` client.

The model is a tiny random one whose LM head only ever picks printable ASCII byte tokens and
whose vocabulary has no merges, so its text re-encodes to exactly the ids it generated:
a prediction equal to the output is then the output, token for token.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from specserve.deployments.rules import DrafterFlags
from specserve.deployments.service import create_deployment
from specserve.deployments.store import DeploymentStore
from specserve.engine.generate import generate
from specserve.engine.prompt_file import load_prompts
from specserve.model.loader import Model, load_model
from specserve.server.app import ServerSettings, create_app
from specserve.server.served import EngineOptions, load_deployments
from specserve.speculative.proposers.prediction import PredictionStats
from specserve.speculative.sampling import SamplingParams
from tests.server_harness import RunningServer, start_server
from tests.tiny import TinySpec, write_tiny_gguf

OPTIONS = EngineOptions(max_batch=4, max_queue=4, max_context=256)
API_KEY = "test-key-123"
PROMPTS = ["the cat sat", "Write a poem about the sea.", "1 2 3 4 5 6", "in the the in"]


@pytest.fixture(scope="module")
def printable(tmp_path_factory: pytest.TempPathFactory) -> Model:
    model_spec = TinySpec(merges=False, printable_output=True, seed=3)
    path = write_tiny_gguf(tmp_path_factory.mktemp("printable") / "printable.gguf", model_spec)
    return load_model(str(path), dtype="float32", progress=False)


def _serve(
    model: Model, db: Path, api_key: str | None = None, record: Path | None = None
) -> RunningServer:
    store = DeploymentStore(db)
    path = str(model.path)
    create_deployment(store, path, DrafterFlags(), id="tiny")  # the default drafter (n-gram)
    create_deployment(store, path, DrafterFlags(no_speculation=True), id="tiny-plain")
    served = load_deployments(store.list(), lambda name: model, OPTIONS)
    settings = ServerSettings(api_key=api_key, max_body_bytes=64 * 1024, record_traffic=record)
    return start_server(served, settings)


@pytest.fixture(scope="module")
def server(printable: Model, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = _serve(printable, tmp_path_factory.mktemp("db") / "deployments.db")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def _reference(model: Model, content: str, max_tokens: int) -> list[int]:
    """Plain greedy decoding of the chat prompt, outside the server."""
    prompt = model.tokenizer.encode_chat([{"role": "user", "content": content}])
    return generate(model, prompt, SamplingParams(max_tokens=max_tokens)).token_ids


def _chat(client: openai.OpenAI, content: str, model: str = "tiny", **kw: object) -> object:
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        temperature=0,
        **kw,  # type: ignore[arg-type]
    )


def test_chat_equals_plain_greedy_and_reports_usage(
    client: openai.OpenAI, printable: Model
) -> None:
    for deployment in ("tiny", "tiny-plain"):
        reply = _chat(client, PROMPTS[0], deployment, max_tokens=24)
        ids = _reference(printable, PROMPTS[0], 24)
        assert reply.choices[0].message.content == printable.tokenizer.decode(ids)
        assert reply.choices[0].finish_reason == "length"
        assert reply.model == deployment
        usage = reply.usage
        assert usage.completion_tokens == 24
        assert usage.prompt_tokens == len(
            printable.tokenizer.encode_chat([{"role": "user", "content": PROMPTS[0]}])
        )
        assert usage.total_tokens == usage.prompt_tokens + 24
        speculation = usage.model_extra["speculation"]
        assert speculation["method"] == ("ngram" if deployment == "tiny" else "none")
        if deployment == "tiny":  # the default drafter ran (self-tuned, so no count asked)
            assert speculation["by_method"]["ngram"]["proposed"] > 0
        else:  # plain: one target step per token after the prefill's, no drafts
            assert speculation["proposed"] == 0 and speculation["target_steps"] == 23


def test_streaming_chat_and_completions_match_non_streaming(client: openai.OpenAI) -> None:
    whole = _chat(client, PROMPTS[1], max_tokens=20).choices[0].message.content
    chunks = list(
        _chat(
            client, PROMPTS[1], max_tokens=20, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20

    done = client.completions.create(model="tiny", prompt="the cat", max_tokens=12, temperature=0)
    streamed = client.completions.create(
        model="tiny", prompt="the cat", max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text
    assert done.usage.completion_tokens == 12 and done.object == "text_completion"


def test_prediction_counts(client: openai.OpenAI, printable: Model) -> None:
    ids = _reference(printable, PROMPTS[2], 40)
    text = printable.tokenizer.decode(ids)
    assert printable.tokenizer.encode(text, add_special_tokens=False) == ids  # the premise
    # A prediction equal to the greedy output is fully accepted, and the output is unchanged.
    reply = _chat(client, PROMPTS[2], "tiny-plain", max_tokens=40, prediction=_content(text))
    details = reply.usage.completion_tokens_details
    assert reply.choices[0].message.content == text
    assert (details.accepted_prediction_tokens, details.rejected_prediction_tokens) == (40, 0)
    # Whether and how much a step drafts is the timing-driven tuner's and the engine guard's
    # choice (under CI load the guard may veto drafting for a whole short request; engagement
    # is proven with fixed lengths in tests/engine/test_speculative.py). What is not timing's
    # choice: every drafted token of an exact prediction is accepted.
    by_method = reply.usage.model_extra["speculation"]["by_method"]
    by_prediction = by_method.get("prediction", {"accepted": 0, "proposed": 0})
    assert by_prediction["accepted"] == by_prediction["proposed"]
    # An edited prediction: counted as OpenAI defines it, output still the greedy output.
    edited = text[:10] + "#####" + text[20:]
    reply = _chat(client, PROMPTS[2], "tiny", max_tokens=40, prediction=_content(edited))
    details = reply.usage.completion_tokens_details
    expected = PredictionStats.count(printable.tokenizer.encode(edited), ids)
    assert reply.choices[0].message.content == text
    assert details.accepted_prediction_tokens == expected.accepted_prediction_tokens
    assert details.rejected_prediction_tokens == expected.rejected_prediction_tokens > 0
    # Text parts are accepted as the prediction content too.
    parts = {"type": "content", "content": [{"type": "text", "text": text}]}
    reply = _chat(client, PROMPTS[2], "tiny", max_tokens=40, prediction=parts)
    assert reply.usage.completion_tokens_details.accepted_prediction_tokens == 40


def _content(text: str) -> dict[str, str]:
    return {"type": "content", "content": text}


def test_prediction_refuses_n_as_openai_does(client: openai.OpenAI) -> None:
    """OpenAI also refuses logprobs, penalties and tools with a prediction; here a prediction
    is only a drafter, so those are served (tests/e2e/test_openai_features.py)."""
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(client, "hi", max_tokens=4, prediction=_content("hi"), n=2)
    error = caught.value.body
    assert error["param"] == "n" and "predicted outputs" in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("extra", "status", "needle"),
    [
        ({"model": "no-such-deployment"}, 404, "does not exist"),
        ({"model": "/etc/passwd"}, 404, "does not exist"),  # never a file path
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"temperature": 3.0}, 400, "temperature"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
        ({"n": 9}, 400, "less than or equal to 8"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "x" * 2000}]}, 400, "context window"),
        # OpenAI's answer to a max_tokens the context cannot hold: a 400 with the numbers.
        ({"max_tokens": 10**12}, 400, "maximum context length is 256 tokens"),
        ({"max_tokens": 250}, 400, "max_tokens can be at most"),
    ],
)
def test_bad_requests_get_openai_errors(
    server: RunningServer, extra: dict[str, object], status: int, needle: str
) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **extra}
    response = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert needle in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_malformed_and_oversized_bodies(server: RunningServer) -> None:
    url = server.base_url + "/v1/chat/completions"
    for headers in ({"content-type": "application/json"}, {}):
        response = httpx.post(url, content=b"{not json", headers=headers, timeout=30)
        assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
        assert response.json()["error"]["param"] is None  # not pydantic's position "1"
    big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 100_000}]}
    response = httpx.post(url, json=big, timeout=30)
    assert response.status_code == 413 and "limit" in response.json()["error"]["message"]
    assert httpx.get(server.base_url + "/nowhere").json()["error"]["type"] == "not_found_error"


def test_concurrent_requests_equal_sequential_ones(client: openai.OpenAI) -> None:
    def ask(content: str) -> str:
        reply = _chat(client, content, max_tokens=32)
        return reply.choices[0].message.content

    sequential = [ask(p) for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        concurrent = list(pool.map(ask, PROMPTS))
    assert concurrent == sequential


def test_disconnect_mid_stream_frees_the_sequence(server: RunningServer) -> None:
    engine = server.served.by_id["tiny"].engine
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "go on"}],
        "max_tokens": 200,
        "temperature": 0,
        "stream": True,
    }
    url = server.base_url + "/v1/chat/completions"
    with httpx.stream("POST", url, json=body, timeout=30) as response:
        lines = response.iter_lines()
        first = [next(lines) for _ in range(4)]
        assert all(line.startswith("data: ") or not line for line in first)
        assert engine.running == 1
    deadline = time.monotonic() + 10
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.running == 0
    metrics = httpx.get(server.base_url + "/metrics").text
    assert (
        'specserve_requests_total{deployment="tiny",endpoint="chat.completions",outcome="cancelled"}'
        in metrics
    )


def test_models_health_and_metrics(server: RunningServer, client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny", "tiny-plain"}
    assert models["tiny"].model_extra["drafter"]["source"] == "default"
    assert models["tiny-plain"].model_extra["drafter"]["method"] is None
    assert httpx.get(server.base_url + "/health").json()["status"] == "ok"
    _chat(client, "the the the the the the", max_tokens=16)
    metrics = httpx.get(server.base_url + "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for name in (
        "specserve_requests_total",
        "specserve_generation_tokens_total",
        "specserve_draft_tokens_total",
        "specserve_accepted_draft_tokens_total",
        "specserve_draft_position_accepted_total",
        "specserve_step_seconds_bucket",
        "specserve_time_to_first_token_seconds_bucket",
        "specserve_running_sequences",
    ):
        assert name in text, name
    drafted = [
        line for line in text.splitlines() if line.startswith("specserve_draft_tokens_total")
    ]
    assert any('method="ngram"' in line and float(line.split()[-1]) > 0 for line in drafted)


def test_api_key_guards_every_route_but_health(printable: Model, tmp_path: Path) -> None:
    running = _serve(printable, tmp_path / "auth.db", api_key=API_KEY)
    try:
        url = running.base_url + "/v1"
        anonymous = openai.OpenAI(base_url=url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            _chat(anonymous, "hi", max_tokens=2)
        assert httpx.get(running.base_url + "/metrics").status_code == 401
        assert httpx.get(running.base_url + "/health").status_code == 200
        keyed = openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0)
        assert _chat(keyed, "hi", max_tokens=2).usage.completion_tokens == 2
    finally:
        running.stop()


def test_streamed_events_are_valid_json(server: RunningServer) -> None:
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 5, "temperature": 0, "stream": True}
    response = httpx.post(server.base_url + "/v1/completions", json=body, timeout=30)
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        assert json.loads(event)["object"] == "text_completion"


def test_requests_are_served_while_one_waits(client: openai.OpenAI) -> None:
    """The event loop is never blocked by compute: a health check answers during a long run."""
    generating, finished = threading.Event(), threading.Event()

    def long_request() -> None:
        for _ in _chat(client, "a long one", max_tokens=200, stream=True):
            generating.set()  # the first chunk: the engine is generating it now
        finished.set()

    thread = threading.Thread(target=long_request)
    thread.start()
    assert generating.wait(30)
    assert client.models.list().data
    assert not finished.is_set()  # answered while the long request was still generating
    thread.join()


def test_traffic_log_records_prompts_for_tune(printable: Model, tmp_path: Path) -> None:
    log = tmp_path / "traffic.jsonl"
    running = _serve(printable, tmp_path / "log.db", record=log)
    try:
        client = openai.OpenAI(base_url=running.base_url + "/v1", api_key="-", max_retries=0)
        _chat(client, "hello there", max_tokens=3, prediction=_content("hi"))
        client.completions.create(model="tiny-plain", prompt=[5, 6, 7], max_tokens=2)
    finally:
        running.stop()
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert rows[0]["messages"] == [{"role": "user", "content": "hello there"}]
    assert rows[0]["prediction"] == "hi" and rows[0]["deployment"] == "tiny"
    assert rows[1]["prompt_token_ids"] == [5, 6, 7]
    assert all("choices" not in row and "text" not in row for row in rows)  # prompts only
    prompts = load_prompts(log)  # `specserve tune --prompts` reads it as is
    assert prompts[0].prediction == "hi" and prompts[1].token_ids(printable) == [5, 6, 7]


@pytest.mark.parametrize(
    "prediction",
    [
        "",  # empty
        "x" * 20_000,  # longer than the 256-token context
        "<|im_end|><|im_start|>assistant\n the cat",  # special tokens spelled out
        "Le chat est sur le tapis.",  # another language than the answer
    ],
    ids=["empty", "over-long", "special-tokens", "other-language"],
)
def test_odd_predictions_are_only_hints(
    client: openai.OpenAI, printable: Model, prediction: str
) -> None:
    """A prediction never changes the answer: odd ones are served (the output equals the
    greedy output) and other requests keep working."""
    ids = _reference(printable, PROMPTS[2], 12)
    reply = _chat(client, PROMPTS[2], "tiny", max_tokens=12, prediction=_content(prediction))
    assert reply.choices[0].message.content == printable.tokenizer.decode(ids)
    assert _chat(client, "hi", max_tokens=2).usage.completion_tokens == 2


def test_a_prediction_that_is_not_utf8_gets_a_400(server: RunningServer) -> None:
    """A lone surrogate (valid JSON escape, not encodable text) is refused, not a 500."""
    body = (
        '{"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}],'
        ' "prediction": {"type": "content", "content": "\\ud800 x"}}'
    )
    response = httpx.post(
        server.base_url + "/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "prediction.content" and "lone surrogate" in error["message"]


async def _body_messages(app: object, path: str, body: dict[str, object]) -> list[bytes]:
    """The bodies of the app's ASGI ``http.response.body`` messages, one per write."""
    sent: list[bytes] = []
    payload = json.dumps(body).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0),
    }  # fmt: skip
    delivered = asyncio.Event()

    async def receive() -> dict[str, object]:
        if not delivered.is_set():
            delivered.set()
            return {"type": "http.request", "body": payload, "more_body": False}
        await asyncio.Event().wait()  # no disconnect
        return {}

    async def send(message: dict[str, object]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            sent.append(bytes(message["body"]))  # type: ignore[arg-type]

    await app(scope, receive, send)  # type: ignore[operator]
    return sent


def test_a_chat_stream_opens_with_its_first_text(server: RunningServer) -> None:
    """The role chunk goes out in the same write as the first text, never alone (behind Ray
    each write is an item that costs CPU): the events are those of a stream, in order."""
    app = create_app(server.served, ServerSettings())
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "the cat sat"}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
    }
    writes = asyncio.run(_body_messages(app, "/v1/chat/completions", body))
    first = [json.loads(e.removeprefix("data: ")) for e in writes[0].decode().split("\n\n") if e]
    assert first[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert first[1]["choices"][0]["delta"]["content"]
    events = b"".join(writes).decode().split("\n\n")
    assert events[-2] == "data: [DONE]" and events[-1] == ""
