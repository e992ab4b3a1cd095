"""The front of `serve --ray` behind HAProxy (`front_proxy`), against a scripted upstream.

No Ray: the upstream is a small ASGI app on uvicorn whose routes stream, die at chosen
points (an exception after the response started makes uvicorn close the connection mid
body, as a killed replica's socket closes) or wait for their client to leave.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from tests.server_harness import free_port

pytest.importorskip("httptools", reason="the front comes with Ray: pip install 'specserve[ray]'")
from specserve.server.front_proxy import RunningFront, start_front

SSE = [(b"content-type", b"text/event-stream")]


class Upstream:
    """Scripted routes; ``calls`` counts requests per path, ``left`` is set when a client
    of ``/wait`` went away."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.left = threading.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        self.calls[path] = self.calls.get(path, 0) + 1
        body = (await receive()).get("body", b"")
        if path == "/echo":
            echoed = json.dumps(_echo(scope, body)).encode()
            length = [(b"content-length", b"%d" % len(echoed))]
            await send({"type": "http.response.start", "status": 201, "headers": length})
            await send({"type": "http.response.body", "body": echoed})
            return
        await send({"type": "http.response.start", "status": 200, "headers": SSE})
        if path == "/dies-first" and self.calls[path] == 1:
            raise RuntimeError("the replica died before its first event")
        if path == "/wait":
            await self._wait(receive, send)
            return
        for i in range(3):
            await send(
                {"type": "http.response.body", "body": b"data: %d\n\n" % i, "more_body": True}
            )
        if path == "/cut":
            await send({"type": "http.response.body", "body": b"data: {half", "more_body": True})
            raise RuntimeError("the replica died mid-stream")
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    async def _wait(self, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.body", "body": b"data: 0\n\n", "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass
        self.left.set()


def _echo(scope: Scope, body: bytes) -> dict[str, Any]:
    headers = {k.decode(): v.decode() for k, v in scope["headers"]}
    return {"query": scope["query_string"].decode(), "body": body.decode(), "headers": headers}


def _serve(app: Any, port: int) -> uvicorn.Server:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        asyncio.run(asyncio.sleep(0.01))
    return server


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[Upstream, int]]:
    app, port = Upstream(), free_port()
    server = _serve(app, port)
    yield app, port
    server.should_exit = True


@pytest.fixture(scope="module")
def front(upstream: tuple[Upstream, int]) -> Iterator[str]:
    port = free_port()
    running: RunningFront = start_front("127.0.0.1", port, ("127.0.0.1", upstream[1]), 64)
    yield f"http://127.0.0.1:{port}"
    running.stop()


def _events(url: str) -> list[str]:
    with httpx.stream("POST", url, content=b"{}", timeout=30) as reply:
        assert reply.status_code == 200
        return [line for line in reply.iter_lines() if line]


def test_requests_and_answers_pass_unchanged(front: str) -> None:
    reply = httpx.post(
        f"{front}/echo?x=1&y=2", content=b'{"a": 1}', headers={"Authorization": "Bearer k"}
    )
    assert reply.status_code == 201
    echoed = reply.json()
    assert echoed["query"] == "x=1&y=2" and echoed["body"] == '{"a": 1}'
    assert echoed["headers"]["authorization"] == "Bearer k"
    assert reply.headers["content-length"] == str(len(reply.content))
    assert _events(f"{front}/stream") == ["data: 0", "data: 1", "data: 2", "data: [DONE]"]


def test_a_client_expecting_100_continue_gets_the_answer_itself(front: str) -> None:
    """The front has the whole body already: the expectation is met, and not passed on (the
    upstream's interim 100 would otherwise be taken for its answer)."""
    reply = httpx.post(f"{front}/echo", content=b"{}", headers={"Expect": "100-continue"})
    assert reply.status_code == 201 and "expect" not in reply.json()["headers"]


def test_a_stream_cut_mid_way_ends_with_the_error_event_on_an_event_boundary(front: str) -> None:
    events = _events(f"{front}/cut")
    assert events[:3] == ["data: 0", "data: 1", "data: 2"] and events[-1] == "data: [DONE]"
    error = json.loads(events[3].removeprefix("data: "))["error"]
    assert error["code"] == "replica_unavailable" and "stopped" in error["message"]
    assert len(events) == 5  # the half event never reached the client


def test_a_replica_lost_before_its_first_bytes_is_retried_once(
    front: str, upstream: tuple[Upstream, int]
) -> None:
    assert _events(f"{front}/dies-first")[-1] == "data: [DONE]"
    assert upstream[0].calls["/dies-first"] == 2


def test_a_client_that_leaves_closes_the_upstream_stream(
    front: str, upstream: tuple[Upstream, int]
) -> None:
    with httpx.stream("POST", f"{front}/wait", content=b"{}", timeout=30) as reply:
        assert next(reply.iter_lines()) == "data: 0"
    assert upstream[0].left.wait(10), "the upstream never saw its client leave"


def test_an_oversized_body_and_a_missing_upstream_get_openai_errors(front: str) -> None:
    too_large = httpx.post(f"{front}/echo", content=b"x" * 65)
    assert (
        too_large.status_code == 413 and "limit of 64 bytes" in too_large.json()["error"]["message"]
    )
    port = free_port()
    nowhere = start_front("127.0.0.1", port, ("127.0.0.1", free_port()), 64)
    try:
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", content=b"{}")
    finally:
        nowhere.stop()
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "replica_unavailable"
