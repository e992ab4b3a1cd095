"""One replica of one deployment on Ray Serve: the single-process server, whole, in an actor.

Each replica builds exactly what ``specserve serve`` builds for one process (the models
loaded and the engine run in one compute thread, `create_app` in front of it) and answers
the requests the ingress forwards to it by calling that app in-process. So a request's
validation, tokenization, drafters, usage and error shapes are the same code as without
Ray, and its output is the single-process server's output.

Imported only by ``serve --ray`` (it imports ray at the top).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from specserve.deployments.store import Deployment
from specserve.server.app import ServerSettings, create_app
from specserve.server.metrics import Metrics
from specserve.server.served import EngineOptions

log = logging.getLogger("specserve.ray")

APP = "specserve"  # the one Serve application: ingress, metrics hub, every deployment's engines
REPLICA_HEADER = "x-specserve-replica"  # which replica answered (debugging, tests)
METRICS_PUSH_SECONDS = 1.0  # how often a replica sends its metrics to the hub
# A response's start waits for its first chunk at most this long (a stream's first text
# comes after the prompt's prefill), so that clients and proxies see the headers in time.
START_ALONE_AFTER_S = 1.0
# A replica's join interval grows with its open streams (`stream_interval_for`) up to this:
# the items it sends per second then stay near 1 / --stream-interval-ms however many clients
# stream, and no stream's text waits longer than this for its next item.
STREAM_INTERVAL_CAP_S = 0.1
METRICS_STALE_SECONDS = 15.0  # a replica silent this long is gone (dead or scaled down)


def stream_interval_for(base: float, open_streams: int) -> float:
    """The join interval of a replica with ``open_streams`` streams: ``base`` (the flag) per
    stream, at most `STREAM_INTERVAL_CAP_S` (or ``base`` if that is larger); 0 stays 0.

    Each item Ray carries costs the ingress and the replica about a millisecond of CPU on the
    2-core VM, taken from the compute threads: 2 replicas x 1 thread at 8 streaming clients
    gave 190-214 tok/s at a fixed 20 ms and 221-224 at 100 ms, by hand (docs/benchmarks.md
    also has the benchmark's rounds, where an uneven split of requests hid it).

    >>> stream_interval_for(0.02, 1), stream_interval_for(0.02, 4), stream_interval_for(0.02, 8)
    (0.02, 0.08, 0.1)
    """
    return min(base * max(1, open_streams), max(base, STREAM_INTERVAL_CAP_S))


def engine_name(deployment_id: str) -> str:
    """The Serve deployment (in `APP`) whose replicas run one stored deployment's engine."""
    return f"engine-{deployment_id}"


class EngineReplica:
    """A continuous-batching engine for one deployment, behind its own OpenAI app."""

    def __init__(
        self,
        deployment: Deployment,
        dtype: str,
        options: EngineOptions,
        threads: int,
        stream_interval: float = 0.0,
        record_traffic: str | None = None,
    ) -> None:
        from specserve.server.run import _start_compute_thread

        self.deployment_id = deployment.id
        self.stream_interval = stream_interval
        self.open_streams = 0  # requests this replica is answering now
        self.served = _start_compute_thread([deployment], dtype, options, threads)
        self.metrics = Metrics()
        self.replica = serve.get_replica_context().replica_id.unique_id
        # The traffic log is written here, where each request is parsed: every replica on a
        # machine appends to that machine's file (`TrafficLog` writes whole lines).
        self.openai_app = self._build_app(Path(record_traffic) if record_traffic else None)
        # On the replica's event loop: Serve's handles in throughput-optimized mode
        # (`ray_run.fast_path_env`) work only there, not from threads of their own.
        self._pusher = asyncio.get_running_loop().create_task(self._push_metrics())

    def _build_app(self, traffic: Path | None) -> FastAPI:
        # No API key and a generous body limit here: the ingress checks both first.
        settings = ServerSettings(max_body_bytes=1 << 30, record_traffic=traffic)
        return create_app(self.served, settings, self.metrics)

    async def handle(
        self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> AsyncIterator[dict[str, Any] | bytes]:
        """Run one HTTP request through the app: first ``{"status", "headers", "body",
        "last"}`` with the body's first chunk, then the rest as it is produced (SSE events
        gathered over `stream_interval_for` this replica's open streams); see `call_asgi`."""
        request = (method, path, query, headers, body)
        self.open_streams += 1
        try:
            async for item in call_asgi(self.openai_app, *request, interval=self._interval):
                if isinstance(item, dict) and "headers" in item:  # the response's start
                    item["headers"].append((REPLICA_HEADER, self.replica))
                yield item
        finally:
            self.open_streams -= 1

    def _interval(self) -> float:
        return stream_interval_for(self.stream_interval, self.open_streams)

    async def _push_metrics(self) -> None:
        hub: DeploymentHandle = serve.get_deployment_handle("MetricsHub", app_name=APP)
        while True:
            await asyncio.sleep(METRICS_PUSH_SECONDS)
            text = self.metrics.render().decode()
            try:
                await asyncio.wait_for(
                    hub.report.remote(self.deployment_id, self.replica, os.getpid(), text), 10
                )
            except Exception as exc:  # the hub restarts or shuts down: next time
                log.debug("metrics push failed: %r", exc)

    def __del__(self) -> None:  # Serve calls this when it stops the replica
        self._pusher.cancel()
        self.served.stop()


class MetricsHub:
    """The last metrics text of every live replica (replicas push, the ingress reads)."""

    def __init__(self) -> None:
        self.reports: dict[str, tuple[str, int, str, float]] = {}

    def report(self, deployment_id: str, replica: str, pid: int, text: str) -> None:
        self.reports[replica] = (deployment_id, pid, text, time.monotonic())

    def live(self) -> dict[str, dict[str, Any]]:
        """``{replica: {"deployment", "pid", "metrics"}}`` of replicas heard from lately."""
        now = time.monotonic()
        return {
            replica: {"deployment": d, "pid": pid, "metrics": text}
            for replica, (d, pid, text, seen) in self.reports.items()
            if now - seen < METRICS_STALE_SECONDS
        }


async def call_asgi(
    app: Any,
    method: str,
    path: str,
    query: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    interval: float | Callable[[], float] = 0.0,
    start_alone_after: float = START_ALONE_AFTER_S,
) -> AsyncIterator[dict[str, Any] | bytes]:
    """Call an ASGI app with a complete request body; yield the response start with the
    body's first chunk as ``{"status", "headers", "body", "last"}`` (one item: each costs a
    Ray message; alone, with an empty body, if no chunk comes within ``start_alone_after``
    seconds: a long prefill), then the rest of the body as bytes, but for its last chunk,
    ``{"body", "last": True}`` ("last" says the body is whole: the ingress then ends its
    client's response without waiting for the end of Ray's stream), each item no sooner than
    ``interval`` seconds after the one before (a number, or a function asked at each item;
    what arrives in between is joined to it; a chunk that comes later than that goes out at
    once). When the caller stops reading (its client went away, or the replica is
    stopping), the app sees ``http.disconnect``, which frees the sequence as a disconnect
    does without Ray."""
    messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await messages.put(message)

    scope = _http_scope(method, path, query, headers)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await messages.put(None)

    task = asyncio.create_task(run())
    try:
        async with contextlib.aclosing(_items(messages, interval, start_alone_after)) as items:
            async for item in items:
                yield item
    finally:
        gone.set()
        try:
            await asyncio.wait_for(task, timeout=5)
        except (TimeoutError, asyncio.CancelledError, Exception):
            task.cancel()


async def _items(
    messages: asyncio.Queue[dict[str, Any] | None],
    interval: float | Callable[[], float],
    start_alone_after: float,
) -> AsyncGenerator[dict[str, Any] | bytes, None]:
    """The app's ASGI messages as `call_asgi` yields them (see there)."""
    start: dict[str, Any] | None = None  # the response's start, until its first chunk
    sent_at = 0.0  # when the last item went out
    while (message := await _next(messages, start, start_alone_after)) is not None:
        if message is _START_ALONE:  # a long prefill: the client gets its headers now
            assert start is not None
            yield {**start, "body": b"", "last": False}
            start, sent_at = None, time.monotonic()
        elif message["type"] == "http.response.start":
            pairs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"]]
            start = {"status": message["status"], "headers": pairs}
        elif message["type"] == "http.response.body":
            data, more = _body_so_far(message, messages)
            wait = interval() if callable(interval) else interval
            if start is None and more and wait > 0:
                data, more = await _body_until(data, messages, sent_at + wait)
            item = _item(start, data, more)
            if item is not None:
                yield item
                start, sent_at = None, time.monotonic()
            if not more:
                return
    if start is not None:  # the app ended without a body message
        yield {**start, "body": b"", "last": True}


def _item(start: dict[str, Any] | None, data: bytes, more: bool) -> dict[str, Any] | bytes | None:
    """The item that carries a chunk of the body (see `call_asgi`); None for an empty chunk
    in mid-body."""
    if start is not None:
        return {**start, "body": data, "last": not more}
    if not more:
        return {"body": data, "last": True}
    return data or None


_START_ALONE: dict[str, Any] = {"type": "start alone"}  # `_next`'s "send the start now"


async def _next(
    messages: asyncio.Queue[dict[str, Any] | None],
    start: dict[str, Any] | None,
    start_alone_after: float,
) -> dict[str, Any] | None:
    """The app's next message; while a response's start waits for its first chunk, at most
    ``start_alone_after`` seconds, then `_START_ALONE`."""
    if start is None:
        return await messages.get()
    try:
        return await asyncio.wait_for(messages.get(), start_alone_after)
    except TimeoutError:
        return _START_ALONE


async def _body_until(
    data: bytes, messages: asyncio.Queue[dict[str, Any] | None], deadline: float
) -> tuple[bytes, bool]:
    """``data`` joined with the body chunks that arrive before ``deadline`` (monotonic
    seconds), and whether more body follows."""
    joined, more = bytearray(data), True
    while more and (left := deadline - time.monotonic()) > 0:
        try:
            message = await asyncio.wait_for(messages.get(), left)
        except TimeoutError:
            break
        if message is None:  # the app finished without a last body message
            return bytes(joined), False
        joined += message.get("body", b"")
        more = message.get("more_body", False)
    return bytes(joined), more


def _http_scope(
    method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]]
) -> dict[str, Any]:
    """The ASGI scope of one HTTP/1.1 request from the loopback address."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
    }


def _body_so_far(
    message: dict[str, Any], messages: asyncio.Queue[dict[str, Any] | None]
) -> tuple[bytes, bool]:
    """The body chunk of ``message`` joined with the chunks already queued behind it, and
    whether more body follows (False once the app has finished).

    Sent as one item: each item Ray streams costs milliseconds (bench/serving.py --ray), and
    under load the engine produces events faster than they are sent. Nothing waits for more
    to arrive.
    """
    data, more = bytearray(message.get("body", b"")), message.get("more_body", False)
    while more and not messages.empty():
        following = messages.get_nowait()
        if following is None:
            more = False
            break
        data += following.get("body", b"")
        more = following.get("more_body", False)
    return bytes(data), more
