"""The one OpenAI-compatible endpoint in front of every deployment's replicas on Ray Serve.

It checks the API key and the body size, reads ``model`` from the request, and forwards the
request to a replica of that deployment through a Serve handle (Serve picks the replica with
the fewest ongoing requests and scales on their count), streaming the answer back.

A replica that dies is replaced by Serve. A request on it that had sent nothing to its
client yet is retried once on another replica; one that had is ended with a 503 in OpenAI's
error shape (in-band, as an SSE error event, when the stream had begun).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.exceptions import RayError
from ray.serve.handle import DeploymentHandle
from starlette.concurrency import run_in_threadpool

from specserve.deployments.store import Deployment
from specserve.server.errors import install_error_handlers, model_not_found, replica_lost
from specserve.server.metrics import Metrics
from specserve.server.middleware import APIKeyAuth, BodyLimit
from specserve.server.ray_replica import APP, engine_name
from specserve.server.ray_run import fast_path_active
from specserve.server.responses import sse

log = logging.getLogger("specserve.ray")

FORWARDED_HEADERS = {b"content-type", b"accept"}
RETRIES = 1  # attempts after the first, only while nothing has reached the client
# How a lost replica shows: Ray's errors, or over gRPC (the fast path) a failed call that Ray
# did not translate (it turns only UNAVAILABLE into its ActorUnavailableError).
REPLICA_LOST_ERRORS = (RayError, grpc.aio.AioRpcError)


class Ingress:
    """Routes by ``model`` exactly as the single-process server does (`ServedDeployments`):
    a deployment id, or a model name served by its default deployment."""

    def __init__(
        self,
        deployments: list[Deployment],
        api_key: str | None,
        max_body: int,
        hub: Any,
        engines: dict[str, DeploymentHandle],
    ) -> None:
        self.deployments = {d.id: d for d in deployments}
        self.default_for_model: dict[str, str] = {}
        for d in sorted(deployments, key=lambda d: d.created_at):
            if d.id == d.model or d.model not in self.default_for_model:
                self.default_for_model[d.model] = d.id
        self.api_key, self.max_body, self.hub = api_key, max_body, hub
        # The transport is chosen here, in the ingress's process: a handle built elsewhere
        # carries the default of the process that imported Serve first (`prepare_ray`).
        by_reference = not fast_path_active()  # Ray's object transfers; else gRPC streams
        self.handles = {
            d: handle.options(stream=True, _by_reference=by_reference)
            for d, handle in engines.items()
        }

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_app(self)

    def lookup(self, name: Any) -> str:
        if isinstance(name, str):
            found = name if name in self.deployments else self.default_for_model.get(name)
            if found is not None and (found == name or "/" not in name):
                return found
        raise model_not_found(name, self.deployments)

    async def forward(self, deployment_id: str, request: Request, body: bytes) -> Response:
        """Send the request to a replica; retry once if it fails before answering."""
        headers = [(k, v) for k, v in request.scope["headers"] if k in FORWARDED_HEADERS]
        call = (request.method, request.url.path, request.scope["query_string"], headers, body)
        for attempt in range(RETRIES + 1):
            stream: Any = self.handles[deployment_id].handle.remote(*call)
            try:
                start = await stream.__anext__()  # with the body's first chunk
            except REPLICA_LOST_ERRORS as exc:  # the replica died before answering
                stream.cancel()
                log.warning(
                    "deployment %s: replica lost (%s), attempt %d", deployment_id, exc, attempt
                )
                if attempt == RETRIES:
                    raise replica_lost(_why(exc)) from None
                continue
            return _response(start, stream)
        raise AssertionError("unreachable")


def _why(exc: BaseException) -> str:
    """How a lost replica's error is named to the client."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"gRPC {exc.code().name}"
    return type(exc).__name__


def _response(start: dict[str, Any], stream: Any) -> Response:
    """The client's response from a replica's items (`ray_replica.call_asgi`). It ends at
    the item marked last; the end of Ray's stream, a message later, is read in the
    background (Serve counts the request as ongoing until then)."""
    headers = {k: v for k, v in start["headers"] if k.lower() != "content-length"}
    if start.get("last"):  # the whole answer: no stream (a JSON body, a 1-token completion)
        _drain(stream)
        return Response(start["body"], start["status"], headers)
    is_sse = headers.get("content-type", "").startswith("text/event-stream")

    async def body() -> AsyncIterator[bytes]:
        finished = False
        try:
            if start["body"]:
                yield start["body"]
            async for item in stream:
                if isinstance(item, bytes):
                    yield item
                    continue
                finished = True  # the last chunk
                _drain(stream)
                if item["body"]:
                    yield item["body"]
                return
            finished = True
        except REPLICA_LOST_ERRORS as exc:
            log.warning("replica lost mid-response: %s", exc)
            if is_sse:  # the 200 is sent: the error goes in-band, as OpenAI's streams do
                error = replica_lost(_why(exc))
                yield sse(error.body()).encode()
                yield b"data: [DONE]\n\n"
        finally:
            if not finished:  # our client went away: free the sequence (costs a Ray call)
                stream.cancel()

    return StreamingResponse(body(), start["status"], headers)


_DRAINING: set[asyncio.Task[None]] = set()  # streams read to their end, held till then


def _drain(stream: Any) -> None:
    """Read the rest of a replica's stream (its end) without holding up the client."""

    async def read() -> None:
        try:
            async for _ in stream:
                log.warning("an item after the one marked last was dropped")
        except Exception as exc:  # the answer is complete: the replica's fate is its own
            log.debug("stream's end not read: %r", exc)

    task = asyncio.get_running_loop().create_task(read())
    _DRAINING.add(task)
    task.add_done_callback(_DRAINING.discard)


def merge_metrics(reports: dict[str, dict[str, Any]]) -> bytes:
    """The replicas' Prometheus texts as one, each sample labelled with its ``replica``."""
    families: dict[str, Any] = {}
    for replica, report in sorted(reports.items()):
        for family in text_string_to_metric_families(report["metrics"]):
            samples = [s._replace(labels={**s.labels, "replica": replica}) for s in family.samples]
            if family.name in families:
                families[family.name].samples.extend(samples)
            else:
                family.samples = samples
                families[family.name] = family

    class Collected:
        def collect(self) -> list[Any]:
            return list(families.values())

    registry = CollectorRegistry()
    registry.register(Collected())
    return generate_latest(registry)


def replica_states(deployment_ids: list[str]) -> dict[str, dict[str, int]]:
    """``{deployment: {"RUNNING": 2, ...}}`` from Serve's status (a blocking call)."""
    application = serve.status().applications.get(APP)
    states: dict[str, dict[str, int]] = {}
    for deployment_id in deployment_ids:
        overview = application.deployments.get(engine_name(deployment_id)) if application else None
        counts = overview.replica_states if overview else {}
        states[deployment_id] = {str(getattr(k, "value", k)): int(n) for k, n in counts.items()}
    return states


async def health_response(ids: list[str]) -> JSONResponse:
    """``/health`` on Ray: each deployment's replicas by state, 503 while one has none
    running."""
    states = await run_in_threadpool(replica_states, ids)
    running = {d: counts.get("RUNNING", 0) for d, counts in states.items()}
    status = "ok" if all(running.values()) else "degraded"
    body = {"status": status, "deployments": ids, "replicas": states, "running": running}
    return JSONResponse(body, 200 if status == "ok" else 503)


async def metrics_response(hub: DeploymentHandle) -> Response:
    """``/metrics`` on Ray: every live replica's metrics, each series labelled by replica."""
    reports = await hub.live.remote()
    return Response(merge_metrics(reports), media_type=Metrics.content_type)


def build_app(ingress: Ingress) -> FastAPI:
    app = FastAPI(title="specserve (Ray Serve)", version="0.1.0")
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=ingress.max_body)
    if ingress.api_key:
        app.add_middleware(APIKeyAuth, api_key=ingress.api_key)
    ids = sorted(ingress.deployments)

    @app.get("/health")
    async def health() -> JSONResponse:
        return await health_response(ids)

    @app.get("/metrics")
    async def metrics() -> Response:
        return await metrics_response(ingress.hub)

    @app.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        data = []
        for deployment_id in ids:
            answer = await ingress.forward(deployment_id, request, b"")
            data += [m for m in json.loads(await _read(answer))["data"]]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str, request: Request) -> Response:
        return await ingress.forward(ingress.lookup(model_id), request, b"")

    @app.post("/v1/chat/completions", response_model=None)
    @app.post("/v1/completions", response_model=None)
    async def complete(request: Request) -> Response:
        body = await request.body()
        try:
            model = json.loads(body).get("model")
        except (ValueError, AttributeError):
            model = None
        # No usable model (not JSON, no "model"): any replica answers the 400 saying why.
        target = ingress.lookup(model) if isinstance(model, str) else ids[0]
        return await ingress.forward(target, request, body)

    return app


async def _read(response: Response) -> bytes:
    if not isinstance(response, StreamingResponse):
        return bytes(response.body)
    chunks = [c if isinstance(c, bytes) else str(c).encode() async for c in response.body_iterator]
    return b"".join(chunks)
