"""`serve --ray` with HAProxy in front (one deployment): the replicas serve the API themselves.

One Ray instance for the module (127.0.0.1, 4 logical CPUs, no dashboard) in Serve's
HAProxy mode as `serve --ray` sets it up, shut down by the fixture whatever happens. One
deployment, "solo", of a tiny printable model, autoscaled between 2 and 3 replicas on one
ongoing request each, behind an API key, recording its traffic. Outputs are compared with
plain greedy decoding in this process.
"""

from __future__ import annotations

import functools
import glob
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
pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

from specserve.server.ray_haproxy import error_page  # noqa: E402
from specserve.server.ray_replica import REPLICA_HEADER  # noqa: E402
from specserve.server.ray_run import haproxy_env  # noqa: E402

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def printable(tmp_path_factory: pytest.TempPathFactory) -> Model:
    return printable_model(tmp_path_factory.mktemp("hap-model"))


@pytest.fixture(scope="module")
def traffic_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hap-traffic") / "traffic.jsonl"


@pytest.fixture(scope="module")
def base_url(
    printable: Model, traffic_log: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    store = DeploymentStore(tmp_path_factory.mktemp("hap-db") / "deployments.db")
    replicas = ReplicaSettings(2, 3, target_ongoing_requests=1)
    create_deployment(store, str(printable.path), DrafterFlags(), id="solo", replicas=replicas)
    port = free_port()
    env = haproxy_env("127.0.0.1", port, replicas=3)  # as `serve --ray` sets it
    settings = ServerSettings(api_key=KEY, record_traffic=traffic_log)
    with serving_on_ray(store.list(), env, port, settings) as url:
        yield url
    state = env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]
    assert not os.path.exists(state), "undeploy leaves HAProxy's directory behind"


def _complete(base_url: str, prompt: str, **kw: Any) -> httpx.Response:
    body = {"model": "solo", "prompt": prompt, "max_tokens": 16, "temperature": 0, **kw}
    return httpx.post(f"{base_url}/v1/completions", json=body, headers=AUTH, timeout=WAIT_S)


def _health(base_url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{base_url}/health", timeout=10).json())  # needs no key


def test_requests_spread_over_replicas_and_equal_single_process(
    base_url: str, printable: Model
) -> None:
    prompts = PROMPTS * 3
    with ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(lambda p: _complete(base_url, p), prompts))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    for prompt, reply in zip(prompts, replies, strict=True):
        assert reply.json()["choices"][0]["text"] == reference(printable, prompt, 16)
    assert len({r.headers[REPLICA_HEADER] for r in replies}) >= 2
    health = _health(base_url)
    assert health["status"] == "ok" and health["deployments"] == ["solo"]


def test_every_replica_records_its_traffic_in_one_log(base_url: str, traffic_log: Path) -> None:
    complete = functools.partial(_complete, base_url, max_tokens=2)
    replicas, _ = log_through_replicas(complete, traffic_log)
    assert len(replicas) >= 2  # two replicas wrote


def test_streaming_the_key_and_errors_through_haproxy(base_url: str, printable: Model) -> None:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["solo"]
    check_streams(client, "solo", printable, PROMPTS[1])
    anonymous = httpx.get(f"{base_url}/v1/models", timeout=10)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["message"]
    not_json = httpx.post(f"{base_url}/v1/completions", content=b"{", headers=AUTH, timeout=10)
    assert not_json.status_code == 400 and not_json.json()["error"]["message"]


def test_metrics_from_every_replica_and_haproxys_error_page(base_url: str) -> None:
    for prompt in PROMPTS * 2:
        assert _complete(base_url, prompt).status_code == 200

    two = until(lambda: len(replicas_in_metrics(base_url, **AUTH)) >= 2, "two replicas' metrics")
    assert two
    # HAProxy's own answers (no replica up) are ours, in OpenAI's error shape.
    state = os.environ["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]
    pages = glob.glob(os.path.join(state, "**", "500.http"), recursive=True)
    assert pages and all(Path(p).read_bytes() == error_page() for p in pages)


def test_a_killed_replica_is_replaced(base_url: str) -> None:
    pids = until(lambda: len(replica_pids("solo")) >= 2 and replica_pids("solo"), "pids")
    victim_replica, victim = next(iter(pids.items()))
    with ThreadPoolExecutor(8) as pool:
        outcomes = [pool.submit(stream_outcome, base_url, "solo", p, **AUTH) for p in PROMPTS * 2]
        time.sleep(0.5)  # the streams are under way
        os.kill(victim, signal.SIGKILL)
        results = [f.result() for f in outcomes]
    # Streams on other replicas complete; those on the victim end with the front's error
    # event (or, if it had sent nothing yet, are retried elsewhere), never cut.
    assert set(results) <= {"ok", "replica_unavailable"} and "ok" in results, results
    until(
        lambda: (
            _health(base_url)["replicas"]["solo"].get("RUNNING", 0) >= 2
            and victim_replica not in replica_pids("solo")
            and len(replica_pids("solo")) >= 2
        ),
        "the replacement replica",
    )
    assert _complete(base_url, PROMPTS[0]).status_code == 200


def test_autoscaling_two_to_three_and_back(base_url: str) -> None:
    def running() -> int:
        return int(_health(base_url)["replicas"]["solo"].get("RUNNING", 0))

    until(lambda: running() == 2, "two replicas")
    scale_up_under_load(
        running,
        lambda pool: [pool.submit(_complete, base_url, p, max_tokens=220) for p in PROMPTS * 2],
        to=3,
    )
    until(lambda: running() == 2, "scale down when idle")
