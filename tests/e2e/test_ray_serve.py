"""`serve --ray`: deployments as Ray Serve applications on a local, loopback-only Ray.

One Ray instance for the module (127.0.0.1, 4 logical CPUs on this 2-core machine, no
dashboard), shut down by the fixture whatever happens. A tiny printable model; deployment
"tiny" has two fixed replicas, "auto" autoscales 1..2 with a target of one request.
Outputs are compared with plain greedy decoding in this process, as tests/e2e/test_server.py
compares the single-process server's.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from specserve.deployments.rules import DrafterFlags, ReplicaSettings
from specserve.deployments.service import create_deployment
from specserve.deployments.store import DeploymentStore
from specserve.model.loader import Model
from specserve.server.app import ServerSettings
from tests.ray_helpers import (
    PROMPTS,
    WAIT_S,
    check_streams,
    log_through_replicas,
    printable_model,
    reference,
    replica_pids,
    replicas_in_metrics,
    scale_up_under_load,
    serving_on_ray,
    stream_outcome,
    until,
)
from tests.server_harness import free_port

ray = pytest.importorskip(
    "ray", reason="Ray is not installed: pip install 'specserve[ray]' (make setup installs it)"
)
# Ray Serve's own pydantic models warn on import; they are not ours to fix.
pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

from specserve.server.ray_replica import REPLICA_HEADER  # noqa: E402
from specserve.server.ray_run import fast_path_env  # noqa: E402


@pytest.fixture(scope="module")
def printable(tmp_path_factory: pytest.TempPathFactory) -> Model:
    return printable_model(tmp_path_factory.mktemp("ray-model"))


@pytest.fixture(scope="module")
def traffic_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ray-traffic") / "traffic.jsonl"


@pytest.fixture(scope="module")
def base_url(
    printable: Model, traffic_log: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    store = DeploymentStore(tmp_path_factory.mktemp("ray-db") / "deployments.db")
    model = str(printable.path)
    create_deployment(store, model, DrafterFlags(), id="tiny", replicas=ReplicaSettings(2, 2))
    auto = ReplicaSettings(1, 2, target_ongoing_requests=1)
    create_deployment(store, model, DrafterFlags(no_speculation=True), id="auto", replicas=auto)
    port = free_port()
    env = fast_path_env(port)  # as `serve --ray` sets it for a Ray of its own
    with serving_on_ray(store.list(), env, port, ServerSettings(record_traffic=traffic_log)) as url:
        yield url


def _complete(base_url: str, prompt: str, model: str = "tiny", **kw: Any) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0, **kw}
    return httpx.post(f"{base_url}/v1/completions", json=body, timeout=WAIT_S)


def _health(base_url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{base_url}/health", timeout=10).json())


def test_requests_spread_over_replicas_and_equal_single_process(
    base_url: str, printable: Model
) -> None:
    prompts = PROMPTS * 3
    with ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(lambda p: _complete(base_url, p), prompts))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    for prompt, reply in zip(prompts, replies, strict=True):
        assert reply.json()["choices"][0]["text"] == reference(printable, prompt, 16)
    assert len({r.headers[REPLICA_HEADER] for r in replies}) == 2
    health = _health(base_url)
    assert health["status"] == "ok" and health["replicas"]["tiny"] == {"RUNNING": 2}


def test_every_replica_records_its_traffic_in_one_log(base_url: str, traffic_log: Path) -> None:
    complete = functools.partial(_complete, base_url, max_tokens=2)
    replicas, rows = log_through_replicas(complete, traffic_log)
    assert len(replicas) == 2  # both replicas wrote
    assert all(row["deployment"] == "tiny" for row in rows)


def test_streaming_and_the_openai_client(base_url: str, printable: Model) -> None:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    assert {m.id for m in client.models.list().data} == {"tiny", "auto"}
    check_streams(client, "tiny", printable, PROMPTS[1])  # errors keep OpenAI's shape too


def test_bad_requests_and_a_client_that_leaves(base_url: str) -> None:
    """The ingress's completion route: errors in OpenAI's shape, and a client that leaves
    mid-stream cancels its sequence on the replica (counted there as cancelled)."""
    url = f"{base_url}/v1/completions"
    not_json = httpx.post(url, content=b"{nope", timeout=WAIT_S)
    assert not_json.status_code == 400 and not_json.json()["error"]["message"]
    wrong_method = httpx.get(url, timeout=WAIT_S)
    assert wrong_method.status_code == 405 and "GET" in wrong_method.json()["error"]["message"]
    body = {"model": "auto", "prompt": "go on", "max_tokens": 240, "temperature": 0}
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=WAIT_S) as reply:
        lines = reply.iter_lines()
        assert next(lines).startswith("data: ")

    def cancelled() -> bool:
        text = httpx.get(f"{base_url}/metrics", timeout=10).text
        return 'deployment="auto",endpoint="completions",outcome="cancelled"' in text

    until(cancelled, "the replica to count the cancelled stream")


def test_metrics_from_every_replica(base_url: str) -> None:
    for prompt in PROMPTS * 2:
        assert _complete(base_url, prompt).status_code == 200

    two = until(lambda: len(replicas_in_metrics(base_url)) >= 2, "two replicas' metrics")
    assert two


def test_a_killed_replica_is_replaced(base_url: str) -> None:
    pids = until(lambda: len(replica_pids("tiny")) == 2 and replica_pids("tiny"), "pids")
    victim_replica, victim = next(iter(pids.items()))
    with ThreadPoolExecutor(8) as pool:
        outcomes = [pool.submit(stream_outcome, base_url, "tiny", p) for p in PROMPTS * 2]
        time.sleep(0.5)  # the streams are under way
        os.kill(victim, signal.SIGKILL)
        results = [f.result() for f in outcomes]
    # Requests on the other replica, and those retried, complete; the rest get the 503.
    assert set(results) <= {"ok", "replica_unavailable"} and "ok" in results, results
    until(
        lambda: (
            _health(base_url)["replicas"]["tiny"] == {"RUNNING": 2}
            and victim_replica not in replica_pids("tiny")
            and len(replica_pids("tiny")) == 2
        ),
        "the replacement replica",
    )
    assert _complete(base_url, PROMPTS[0]).status_code == 200


def test_autoscaling_one_to_two_and_back(base_url: str) -> None:
    def running() -> int:
        return int(_health(base_url)["replicas"]["auto"].get("RUNNING", 0))

    assert running() == 1
    scale_up_under_load(
        running,
        lambda pool: [pool.submit(_complete, base_url, p, "auto", max_tokens=220) for p in PROMPTS],
        to=2,
    )
    until(lambda: running() == 1, "scale down when idle")
