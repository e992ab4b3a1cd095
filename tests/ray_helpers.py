"""What the Ray Serve tests (tests/e2e/test_ray_*.py) share: waiting with a bound, the
single-process reference output, the live replicas' pids, how a stream ended, and the
checks both fronts (the ingress, HAProxy) must pass."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from specserve.deployments.store import Deployment
from specserve.engine.generate import generate
from specserve.model.loader import Model, load_model
from specserve.server.app import ServerSettings
from specserve.server.served import EngineOptions
from specserve.speculative.sampling import SamplingParams
from tests.tiny import TinySpec, write_tiny_gguf

WAIT_S = 90.0  # the longest any condition in these tests may take to come true
OPTIONS = EngineOptions(max_batch=4, max_queue=8, max_context=256)
PROMPTS = ["the cat sat", "Write a poem about the sea.", "1 2 3 4 5 6", "in the the in"]


def printable_model(directory: Path) -> Model:
    """A tiny random model whose outputs print, written as GGUF and loaded as replicas do."""
    model_spec = TinySpec(merges=False, printable_output=True, seed=3)
    path = write_tiny_gguf(directory / "printable.gguf", model_spec)
    return load_model(str(path), dtype="float32", progress=False)


@contextmanager
def serving_on_ray(
    deployments: list[Deployment], env: dict[str, str], port: int, settings: ServerSettings
) -> Iterator[str]:
    """`serve --ray` in this process: ``env`` set as `serve` sets it before Ray starts, a
    loopback Ray of 4 logical CPUs, the deployments on it (1 thread a replica, autoscaling
    within seconds); yields the base URL, then stops everything and restores the env."""
    import ray

    from specserve.server.ray_run import Scaling, deploy, undeploy

    saved = dict(os.environ)
    os.environ.update(env)
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=4, include_dashboard=False)
    try:
        deploy(
            deployments,
            dtype="float32",
            options=OPTIONS,
            threads=1,
            settings=settings,
            host="127.0.0.1",
            port=port,
            scaling=Scaling(upscale_delay_s=1.0, downscale_delay_s=3.0),
        )
        yield f"http://127.0.0.1:{port}"
    finally:
        undeploy(started_cluster=True)
        os.environ.clear()
        os.environ.update(saved)


def until(condition: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    """``condition()``'s first true value, polled; fails the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def reference(model: Model, prompt: str, max_tokens: int) -> str:
    """Plain greedy decoding in this process: what every replica must answer."""
    ids = generate(model, model.tokenizer.encode(prompt), SamplingParams(max_tokens=max_tokens))
    return model.tokenizer.decode(ids.token_ids)


def replica_pids(deployment: str) -> dict[str, int]:
    """``{replica: pid}`` of ``deployment``'s replicas that reported to the metrics hub."""
    from ray import serve

    from specserve.server.ray_replica import APP

    hub = serve.get_deployment_handle("MetricsHub", app_name=APP)
    live = hub.live.remote().result(timeout_s=10)
    return {r: v["pid"] for r, v in live.items() if v["deployment"] == deployment}


def stream_outcome(base_url: str, model: str, prompt: str, **headers: str) -> str:
    """How a 200-token stream ended: "ok", the error code it got (HTTP or an in-band SSE
    error event), or "cut" when the connection closed before the stream's end."""
    body = {"model": model, "prompt": prompt, "max_tokens": 200, "temperature": 0, "stream": True}
    url = f"{base_url}/v1/completions"
    try:
        with httpx.stream("POST", url, json=body, headers=headers, timeout=WAIT_S) as reply:
            if reply.status_code != 200:
                return str(json.loads(reply.read())["error"]["code"])
            for line in reply.iter_lines():
                if line.startswith("data: {") and '"error"' in line:
                    return str(json.loads(line[6:])["error"]["code"])
                if line == "data: [DONE]":
                    return "ok"
    except httpx.RemoteProtocolError:
        pass
    return "cut"


def check_streams(client: openai.OpenAI, model: str, printable: Model, prompt: str) -> None:
    """A completion stream equals the reference, a chat stream reports its usage last, and
    an unknown model is OpenAI's 404, all through the official client."""
    stream = client.completions.create(
        model=model, prompt=prompt, max_tokens=20, temperature=0, stream=True
    )
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert text == reference(printable, prompt, 20)
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(chat)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)


def replicas_in_metrics(base_url: str, **headers: str) -> set[str]:
    """The replicas whose request counters ``/metrics`` shows (its ``replica`` label)."""
    text = httpx.get(f"{base_url}/metrics", headers=headers, timeout=10).text
    lines = [line for line in text.splitlines() if line.startswith("specserve_requests_total{")]
    return {line.split('replica="')[1].split('"')[0] for line in lines if 'replica="' in line}


def scale_up_under_load(
    running: Callable[[], int], load: Callable[[ThreadPoolExecutor], list[Future[Any]]], to: int
) -> None:
    """Keep ``load`` going (again whenever it is done) until ``running()`` reaches ``to``
    replicas; every request must succeed. The autoscaler then has to scale back by itself."""
    with ThreadPoolExecutor(8) as pool:
        batch = load(pool)
        deadline = time.monotonic() + WAIT_S
        while running() < to and time.monotonic() < deadline:
            if all(f.done() for f in batch):
                batch = load(pool)
            time.sleep(0.25)
        assert running() == to, "did not scale up under load"
        assert all(f.result().status_code == 200 for f in batch)


def log_through_replicas(
    complete: Callable[[str], httpx.Response], traffic_log: Path
) -> tuple[set[str], list[dict[str, Any]]]:
    """Send 12 short requests at once; every one must be logged once, as a whole line, in
    the one log all replicas append to. Returns the replicas that answered and the rows."""
    from specserve.server.ray_replica import REPLICA_HEADER

    prompts = [f"logged {i} the cat" for i in range(12)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(complete, prompts))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    rows = [json.loads(line) for line in traffic_log.read_text().splitlines()]  # whole lines
    ours = [row for row in rows if row["prompt"] in prompts]
    assert sorted(row["prompt"] for row in ours) == sorted(prompts)  # each once
    return {r.headers[REPLICA_HEADER] for r in replies}, ours
