"""What the Ray Serve tests (tests/e2e/test_ray_*.py) share: waiting with a bound, the
single-process reference output, the live replicas' pids, and how a stream ended."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx

from specserve.engine.generate import generate
from specserve.model.loader import Model
from specserve.speculative.sampling import SamplingParams

WAIT_S = 90.0  # the longest any condition in these tests may take to come true


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
