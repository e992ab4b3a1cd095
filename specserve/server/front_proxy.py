"""The front of ``serve --ray`` behind HAProxy: relays to HAProxy, and speaks for a lost replica.

HAProxy balances over the engine replicas and retries a request whose replica died before
answering anything. What it cannot do is end a stream well once its replica died mid-way:
the connection just closes. This front, one uvicorn server in the ``serve`` process itself
(no Ray, no engine), forwards every request to HAProxy unchanged and streams the answer
back byte for byte, so the API stays the replica's own. It adds what the ingress gives:

- the client's response starts with the replica's first body bytes (or after
  `HOLD_START_S`): if the replica dies before them, the request is sent again, once;
- a stream cut after that ends with an in-band ``data: {"error": ...}`` event (code
  ``replica_unavailable``, as the ingress sends) and ``data: [DONE]``, on an event boundary;
- a client that goes away closes its upstream connection, so its replica stops generating.

The body is read here (it may be sent twice), within ``--max-body-bytes`` (413 beyond).
The client to HAProxy is `specserve.server.upstream`'s: the front's cost is added to every
request, and that lean client costs less than aiohttp's or httpx's (its doc has the figures).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

import uvicorn
from starlette.types import Message, Receive, Scope, Send

from specserve.server.errors import replica_lost
from specserve.server.middleware import read_body, send_error
from specserve.server.responses import sse
from specserve.server.upstream import Response, UpstreamLost, UpstreamPool

log = logging.getLogger("specserve.front")

RETRIES = 1  # a request whose replica sent nothing is sent again this many times
HOLD_START_S = 1.0  # the client's response waits at most this long for the first bytes
START_WAIT_S = 30.0  # how long `start_front` waits for its server to listen
# Headers each hop sets for itself: the connection-level ones (RFC 9110, 7.6.1), the host and
# the body's length, and Expect (the front holds the whole body: the expectation is met). The
# rest pass unchanged.
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade", b"host"}
    | {b"proxy-authenticate", b"proxy-authorization", b"content-length", b"expect"}
)


class FrontProxy:
    """An ASGI app that relays each HTTP request to ``upstream`` (see the module's doc)."""

    def __init__(self, upstream: tuple[str, int], max_body_bytes: int) -> None:
        self.upstream, self.max_body_bytes = upstream, max_body_bytes
        self.client: UpstreamPool | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = await read_body(scope, receive, send, self.max_body_bytes)
        if body is None:  # refused (413), or the client left before sending it
            return
        relay = asyncio.ensure_future(self._relay(scope, body, send))
        left = asyncio.ensure_future(_client_left(receive))
        await asyncio.wait({relay, left}, return_when=asyncio.FIRST_COMPLETED)
        left.cancel()
        if not relay.done():  # the client went away: drop the upstream connection too
            relay.cancel()
        await asyncio.gather(relay, return_exceptions=True)
        if not relay.cancelled() and relay.exception():
            log.error("relaying %s failed", scope["path"], exc_info=relay.exception())

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.client = UpstreamPool(*self.upstream)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.client is not None:
                    self.client.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _relay(self, scope: Scope, body: bytes, send: Send) -> None:
        """Send the request upstream (again, once, if it got no bytes back), then stream the
        answer to the client, ending it in-band if it is cut."""
        assert self.client is not None, "the front serves only after its lifespan started"
        request = Request(
            scope["method"],
            scope["raw_path"].decode("latin-1") + _query(scope),
            [(k, v) for k, v in scope["headers"] if k not in HOP_BY_HOP],
            body,
        )
        for attempt in range(RETRIES + 1):
            opened = await _open(self.client, request)
            if isinstance(opened, Exception):  # nothing was sent to the client yet
                log.warning("replica lost before answering (%r), attempt %d", opened, attempt)
                if attempt == RETRIES:
                    await send_error(send, 503, replica_lost(type(opened).__name__).body())
                continue
            upstream, first = opened
            try:
                await send(_start(upstream))
                await _stream(first, upstream, send)
            finally:
                first.cancel()
                upstream.close()
            return


@dataclass(frozen=True)
class Request:
    """A client's request as the front sends it upstream (hop-by-hop headers dropped)."""

    method: str
    target: str
    headers: list[tuple[bytes, bytes]]
    body: bytes


async def _open(
    client: UpstreamPool, request: Request
) -> tuple[Response, asyncio.Future[bytes]] | UpstreamLost:
    """Send ``request``; its response and the read of its first body bytes (done, or still
    pending after `HOLD_START_S`). The error instead when it failed before any body bytes."""
    try:
        upstream = await client.request(
            request.method, request.target, request.headers, request.body
        )
    except UpstreamLost as exc:  # HAProxy itself did not answer
        return exc
    first = asyncio.ensure_future(upstream.read())
    try:
        await asyncio.wait({first}, timeout=HOLD_START_S)
    except asyncio.CancelledError:  # the client left
        first.cancel()
        upstream.close()
        raise
    failed = first.done() and not first.cancelled() and first.exception()
    if isinstance(failed, UpstreamLost):
        upstream.close()
        return failed
    return upstream, first


async def _stream(first: asyncio.Future[bytes], upstream: Response, send: Send) -> None:
    """Send the body's bytes as they come; for an event stream, whole events only, so that
    a cut one can be replaced by the error event."""
    is_sse, pending = _is_sse(upstream), b""
    try:
        chunk = await first
        while chunk:
            if is_sse:
                data = pending + chunk
                end = data.rfind(b"\n\n")
                boundary = end + 2 if end >= 0 else 0
                chunk, pending = data[:boundary], data[boundary:]
            if chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            chunk = await upstream.read()
    except UpstreamLost as exc:
        log.warning("replica lost mid-response: %r", exc)
        if not is_sse:  # a cut body stays cut: uvicorn closes the client's connection
            raise
        # the 200 is sent: the error goes in-band, as OpenAI's streams do
        pending = sse(replica_lost(type(exc).__name__).body()).encode() + b"data: [DONE]\n\n"
    await send({"type": "http.response.body", "body": pending, "more_body": False})


def _start(upstream: Response) -> Message:
    headers = [(k, v) for k, v in upstream.headers if k not in HOP_BY_HOP]
    length = upstream.header(b"content-length")
    if length is not None and not _is_sse(upstream):  # a whole body: keep its length
        headers.append((b"content-length", length))
    return {"type": "http.response.start", "status": upstream.status, "headers": headers}


def _is_sse(upstream: Response) -> bool:
    return (upstream.header(b"content-type") or b"").startswith(b"text/event-stream")


def _query(scope: Scope) -> str:
    query = scope.get("query_string", b"")
    return "?" + query.decode("latin-1") if query else ""


async def _client_left(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


@dataclass
class RunningFront:
    """A `FrontProxy` served by uvicorn in a thread of this process."""

    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_front(
    host: str, port: int, upstream: tuple[str, int], max_body_bytes: int
) -> RunningFront:
    """Serve a `FrontProxy` to ``upstream`` on ``host:port``; returns once it listens."""
    app = FrontProxy(upstream, max_body_bytes)
    # none of uvicorn's per-request extras (access log, X-Forwarded-For): the front is on every
    # request's path, and the replica behind it logs
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        proxy_headers=False,
        server_header=False,
        date_header=False,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="specserve-front", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_WAIT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the front proxy could not serve on {host}:{port}")
        time.sleep(0.01)
    return RunningFront(server, thread)
