"""The API against its own OpenAPI document: schemathesis generates requests from
``app.openapi()`` for every route and sends them to a live server; no answer may be a 5xx
or carry a stack trace.

Bodies are bounded so the run stays short (well under a minute on two cores): ``model``
names a served deployment (random names only meet the 404 path), ``max_tokens`` is at most
4. Everything else is as generated: response formats with arbitrary schemas, tools with
arbitrary parameter schemas, logit_bias, n, logprobs, streaming, predictions.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from specserve.deployments.rules import DrafterFlags
from specserve.deployments.service import create_deployment
from specserve.deployments.store import DeploymentStore
from specserve.model.loader import load_model
from specserve.server.app import ServerSettings, create_app
from specserve.server.served import EngineOptions, ServedDeployments, load_deployments
from tests.server_harness import RunningServer, start_server
from tests.tiny import TinySpec, write_tiny_gguf
from tests.unit.test_tools import HERMES_TEMPLATE

MAX_TOKENS = 4  # per generated request: the run checks answers, not long generations
EXAMPLES = 40  # per route and method
OPTIONS = EngineOptions(max_batch=8, max_queue=32, max_context=512)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("openapi")
    models = {}
    for name, template in (("chatml", None), ("hermes", HERMES_TEMPLATE)):
        model_spec = TinySpec(merges=False, printable_output=True, seed=3, context=512)
        if template is not None:
            model_spec = TinySpec(
                merges=False, printable_output=True, seed=3, chat_template=template
            )
        path = write_tiny_gguf(folder / f"{name}.gguf", model_spec)
        models[path.name] = load_model(str(path), dtype="float32", progress=False)
    store = DeploymentStore(folder / "deployments.db")
    create_deployment(store, str(folder / "chatml.gguf"), DrafterFlags(), id="tiny")
    create_deployment(store, str(folder / "hermes.gguf"), DrafterFlags(), id="tools")
    served = load_deployments(store.list(), lambda name: models[Path(name).name], OPTIONS)
    running = start_server(served, ServerSettings())
    yield running
    running.stop()


# The document does not depend on which deployments are served.
schema = schemathesis.openapi.from_dict(create_app(ServedDeployments([])).openapi())


def _bounded(body: Any) -> None:
    """Name a served deployment, cap the tokens; ask for logprobs where top_logprobs is set
    and make tool answers user turns (rules the document cannot state: without this most
    generated bodies would be 400s that never reach the engine)."""
    if not isinstance(body, dict):
        return
    if isinstance(body.get("top_logprobs"), int) and body.get("logprobs") in (None, False):
        body["logprobs"] = True
    for message in body.get("messages") or []:  # a tool answer must name an earlier call
        if isinstance(message, dict) and message.get("role") == "tool":
            message["role"] = "user"
    body["model"] = "tools" if body.get("tools") else "tiny"
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is None or (isinstance(value, int) and value > MAX_TOKENS):
            body[key] = MAX_TOKENS  # schemathesis also sends invalid values: left as they are


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same examples every run: a failure here is reproducible
)
def test_no_5xx_and_no_trace(case: Any, server: RunningServer) -> None:
    _bounded(case.body)
    response = case.call(base_url=server.base_url, timeout=60)
    assert response.status_code < 500, (case.body, response.text)
    assert "Traceback" not in response.text and 'File "' not in response.text
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
