"""``serve --ray --ray-proxy haproxy``: the engine replicas face the clients, behind HAProxy.

With one deployment on the Ray instance ``serve --ray`` starts (`ray_run.choose_proxy`), Ray
Serve's HAProxy balances over the deployment's replicas, fewest open connections first. Each
replica serves the whole OpenAI API over HTTP on a port of its own (Serve's direct ingress):
the single-process server's app, with the API key and the body limit, so a request crosses
no Ray hop at all (docs/ray.md has the measurements). What the ingress answers for every
replica, each replica answers here: ``/health`` (the deployment's replicas by state, from
Serve) and ``/metrics`` (every live replica's, from the metrics hub).

In front of HAProxy, on ``--port``, our `front_proxy` runs in the ``serve`` process: HAProxy
listens on a loopback port behind it. Faults: a request whose replica dies before answering
anything is retried once on another replica by HAProxy (`ray_run.haproxy_env`), or by the
front when the replica had sent only its headers; a stream cut mid-way by its replica's death
ends with the front's in-band error event and ``[DONE]``; HAProxy's own answers (no replica
up) carry OpenAI's error shape (`write_error_page`).

Imported only by ``serve --ray`` (it imports ray at the top).
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from specserve.deployments.store import Deployment
from specserve.server.app import ServerSettings, create_app
from specserve.server.errors import error_body
from specserve.server.front_proxy import RunningFront, start_front
from specserve.server.ray_ingress import health_response, metrics_response
from specserve.server.ray_replica import (
    APP,
    REPLICA_HEADER,
    EngineReplica,
    MetricsHub,
    engine_name,
)
from specserve.server.ray_run import HAPROXY_PORT_VARIABLE, RaySetupError
from specserve.server.served import EngineOptions

log = logging.getLogger("specserve.ray")

ERROR_PAGE_WAIT_S = 60.0  # how long `write_error_page` waits for Serve to write its own
ROUTES_WAIT_S = 60.0  # how long `deploy_behind_haproxy` waits for HAProxy to know the replicas
LOOPBACK = "127.0.0.1"  # HAProxy listens here, behind the front (`front_proxy`)
RUNNING_FRONTS: list[RunningFront] = []  # the front `deploy_behind_haproxy` runs in this process
NO_REPLICA = "no replica of this deployment could answer (it stopped or is starting); please retry"


class FacingReplica(EngineReplica):
    """An engine replica that serves its app to HAProxy itself (Serve's direct ingress)."""

    def __init__(
        self,
        deployment: Deployment,
        dtype: str,
        options: EngineOptions,
        threads: int,
        settings: ServerSettings,
        hub: DeploymentHandle,
    ) -> None:
        self.settings, self.hub = settings, hub
        traffic = str(settings.record_traffic) if settings.record_traffic else None
        super().__init__(deployment, dtype, options, threads, record_traffic=traffic)

    def _build_app(self, traffic: Path | None) -> FastAPI:
        """The app with ``serve``'s own settings (API key, body limit, and ``traffic``, the
        log in them), and /health and /metrics answered for the whole deployment."""
        own = APIRouter()

        @own.get("/health")
        async def health() -> JSONResponse:
            return await health_response([self.deployment_id])

        @own.get("/metrics")
        async def metrics() -> Response:
            return await metrics_response(self.hub)

        app = create_app(self.served, self.settings, self.metrics, overrides=own)
        app.add_middleware(ReplicaHeader, replica=self.replica)
        return app

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self.openai_app


class ReplicaHeader:
    """Names the replica that answered in every response (`REPLICA_HEADER`), as the ingress
    does: for debugging, and for the tests to see requests spread."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, named)


def error_page() -> bytes:
    """HAProxy's answer when no replica answers: a whole HTTP response, a 503 in OpenAI's
    error shape with the code our ingress uses for a lost replica."""
    body = json.dumps(error_body(NO_REPLICA, "server_error", code="replica_unavailable"))
    head = "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    head += f"Cache-Control: no-cache\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return (head + body).encode()


def write_error_page(state_dir: str) -> None:
    """Put `error_page` where Serve's HAProxy reads its error answers.

    Ray Serve 2.60 writes a plain-text "500 Internal Server Error" page (``500.http``) into
    each HAProxy's directory, under the ``state_dir`` of `ray_run.haproxy_env`, when it starts
    that HAProxy, and names it for HAProxy's 502, 503 and 504; HAProxy reads it again at each
    reload, which every change of replicas brings. So the page is replaced as soon as Serve
    has written it, before the replicas come up. Waits at most `ERROR_PAGE_WAIT_S`."""
    deadline = time.monotonic() + ERROR_PAGE_WAIT_S
    while time.monotonic() < deadline:
        pages = glob.glob(os.path.join(state_dir, "**", "500.http"), recursive=True)
        if pages:
            for page in pages:
                Path(page).write_bytes(error_page())
            return
        time.sleep(0.05)
    log.warning("no HAProxy error page under %s: its errors stay plain text", state_dir)


def deploy_behind_haproxy(
    deployment: Deployment,
    replica_options: dict[str, Any],
    *,
    dtype: str,
    options: EngineOptions,
    threads: int,
    settings: ServerSettings,
    host: str,
    port: int,
) -> None:
    """Run `APP`: our front on ``host:port``, HAProxy behind it (on a loopback port) in
    front of ``deployment``'s replicas, and the metrics hub; returns when all replicas are up
    (raises if one cannot start)."""
    behind = int(os.environ[HAPROXY_PORT_VARIABLE])  # chosen with Serve's own ports
    serve.start(http_options={"host": LOOPBACK, "port": behind})
    state_dir = os.environ["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]
    threading.Thread(target=write_error_page, args=(state_dir,), daemon=True).start()
    hub = serve.deployment(name="MetricsHub", ray_actor_options={"num_cpus": 0})(MetricsHub)
    facing = serve.ingress()(FacingReplica)
    engine = serve.deployment(name=engine_name(deployment.id), **replica_options)(facing)
    app = engine.bind(deployment, dtype, options, threads, settings, hub.bind())
    serve.run(app, name=APP, route_prefix="/")
    # Serve tells HAProxy of new replicas a moment after they run; until then it sends
    # requests to Serve's own proxy (slower), so `serve` says it serves once HAProxy knows.
    deadline = time.monotonic() + ROUTES_WAIT_S
    while replicas_behind_haproxy(state_dir) < deployment.replicas.min_replicas:
        if time.monotonic() > deadline:
            log.warning("HAProxy does not list every replica yet; Serve's proxy stands in")
            break
        time.sleep(0.1)
    try:
        RUNNING_FRONTS.append(start_front(host, port, (LOOPBACK, behind), settings.max_body_bytes))
    except RuntimeError as exc:
        raise RaySetupError(str(exc)) from None


def stop_front() -> None:
    """Stop the front that `deploy_behind_haproxy` started, if any."""
    while RUNNING_FRONTS:
        RUNNING_FRONTS.pop().stop()


def replicas_behind_haproxy(state_dir: str) -> int:
    """How many engine replicas HAProxy sends requests to now (UP in its statistics, read
    from its admin socket under ``state_dir``)."""
    names: set[str] = set()
    for path in glob.glob(os.path.join(state_dir, "*", "admin.sock")):
        try:
            with socket.socket(socket.AF_UNIX) as admin:
                admin.settimeout(2.0)
                admin.connect(path)
                admin.sendall(b"show stat\n")
                data = b"".join(iter(lambda: admin.recv(1 << 16), b""))
        except OSError:
            continue
        rows = csv.DictReader(io.StringIO(data.decode().removeprefix("# ")))
        names |= {
            row["svname"]
            for row in rows
            if row.get("svname", "").startswith("SERVE_REPLICA") and row["status"] == "UP"
        }
    return len(names)
