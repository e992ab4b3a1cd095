"""The completion routes of the Ray ingress as plain ASGI: the request's hot path.

Every completion crosses the ingress, so its cost there is Ray's overhead per request.
FastAPI's routing, request object and ``StreamingResponse`` (a task group per response)
took about 3 of the ingress's 4 ms of CPU per request on this 2-core machine (py-spy,
docs/ray.md). Here a completion reads its body, picks the deployment from ``model``, and
relays the replica's answer chunk by chunk to ``send``; every other route (health, metrics,
models) stays on the FastAPI app. The API-key and body-size layers sit in front of both.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from ray.exceptions import RayActorError, RayError
from starlette.types import ASGIApp, Receive, Scope, Send

from specserve.server.errors import APIError, error_body
from specserve.server.responses import sse

if TYPE_CHECKING:
    from specserve.server.ray_ingress import Ingress

log = logging.getLogger("specserve.ray")

COMPLETION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
FORWARDED_HEADERS = frozenset({b"content-type", b"accept"})


class CompletionRoutes:
    """ASGI: POST to a completion path is relayed here; anything else goes to ``app``."""

    def __init__(self, ingress: Ingress, app: ASGIApp) -> None:
        self.ingress, self.app = ingress, app
        self.first_deployment = sorted(ingress.deployments)[0]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in COMPLETION_PATHS:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            message = f"{scope['method']} {scope['path']}: Method Not Allowed"
            await send_json(send, 405, error_body(message, "invalid_request_error"))
            return
        body = await read_body(receive)
        if body is None:  # the client left before sending it all
            return
        try:
            target = self.deployment_for(body)
            headers = [(k, v) for k, v in scope["headers"] if k in FORWARDED_HEADERS]
            call = ("POST", scope["path"], scope["query_string"], headers, body)
            start, first, stream = await self.ingress.open(target, call)
        except APIError as exc:
            await send_json(send, exc.status, exc.body())
            return
        await relay(start, first, stream, send)

    def deployment_for(self, body: bytes) -> str:
        """The deployment that ``model`` names; with no usable ``model`` (not JSON, none
        given) any deployment's replica answers the 400 saying why."""
        try:
            model = json.loads(body).get("model")
        except (ValueError, AttributeError):
            model = None
        return self.ingress.lookup(model) if isinstance(model, str) else self.first_deployment


async def read_body(receive: Receive) -> bytes | None:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def relay(start: dict[str, Any], first: bytes | None, stream: Any, send: Send) -> None:
    """Send the replica's answer as it comes. A client that leaves ends the Ray stream, so
    the replica frees the sequence (Serve cancels this handler on a disconnect); a replica
    lost mid-stream ends an SSE stream in-band with a 503 error event, as OpenAI's streams
    carry errors."""
    pairs = [(k.lower(), v) for k, v in start["headers"] if k.lower() != "content-length"]
    is_sse = dict(pairs).get("content-type", "").startswith("text/event-stream")
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in pairs]
    await send({"type": "http.response.start", "status": start["status"], "headers": headers})
    finished = first is None
    try:
        if first is not None:
            await send({"type": "http.response.body", "body": first, "more_body": True})
        async for chunk in stream:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finished = True
    except (RayActorError, RayError) as exc:
        finished = True
        log.warning("replica lost mid-response: %s", exc)
        if is_sse:
            tail = sse(replica_lost(exc).body()).encode() + b"data: [DONE]\n\n"
            await send({"type": "http.response.body", "body": tail, "more_body": True})
    except OSError:  # the server could not write: the client is gone
        return
    finally:
        if not finished:
            stream.cancel()
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def replica_lost(exc: Exception) -> APIError:
    """503 in OpenAI's shape: the replica serving the request stopped."""
    message = f"the replica serving this request stopped ({type(exc).__name__}); please retry"
    return APIError(503, message, "server_error", code="replica_unavailable")
