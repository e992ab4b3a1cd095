"""ASGI layers in front of the routes: API-key authentication and a request body bound.

Both answer in OpenAI's error shape before any route (or JSON parsing) runs.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from specserve.server.errors import error_body

OPEN_PATHS = frozenset({"/health"})  # reachable without the API key (load balancer checks)


async def send_error(send: Send, status: int, body: dict[str, Any], bearer: bool = False) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
    if bearer:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class APIKeyAuth:
    """Every route but ``/health`` needs ``Authorization: Bearer <key>`` (when a key is set)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not secrets.compare_digest(given, self.expected):
            message = (
                "missing API key: send 'Authorization: Bearer <key>'"
                if not given
                else "incorrect API key provided"
            )
            body = error_body(message, "invalid_request_error", code="invalid_api_key")
            await send_error(send, 401, body, bearer=True)
            return
        await self.app(scope, receive, send)


class _BodyTooLarge(Exception):
    """A request body over the server's limit."""


async def read_body(scope: Scope, receive: Receive, send: Send, max_bytes: int) -> bytes | None:
    """A request's whole body, reading no more than ``max_bytes`` of it: beyond, the 413 is
    sent here and None returned. None too when the client left first."""
    try:
        return await _read_within(scope, receive, max_bytes)
    except _BodyTooLarge:
        message = f"request body is larger than this server's limit of {max_bytes} bytes"
        await send_error(send, 413, error_body(message, "invalid_request_error"))
        return None


async def _read_within(scope: Scope, receive: Receive, max_bytes: int) -> bytes | None:
    declared = dict(scope["headers"]).get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > max_bytes:
            raise _BodyTooLarge
        if not message.get("more_body", False):
            return b"".join(chunks)


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` (413) without reading more than that.

    The body is buffered here, then replayed to the app; later ``receive`` calls pass
    through, so routes still see the client's disconnect.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = await read_body(scope, receive, send, self.max_bytes)
        if body is None:  # refused (413), or the client left
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
