"""A lean HTTP/1.1 client for the front's one upstream (HAProxy on loopback).

The front relays every request of ``serve --ray``, so its cost is added to each of them. It
needs little of a general client: one host, requests whose body it already holds, answers
relayed as their bytes come, kept-alive connections. Written on asyncio's protocols with
httptools' parser (llhttp, what uvicorn parses with), the front spends 0.45 ms of CPU a
request and adds 0.3 ms to a round trip to a trivial server; with aiohttp's client it spent
0.69 ms and added 0.6 ms (by hand, 1,500 and 300 POSTs, medians; docs/ray.md).

`UpstreamLost` is raised when the connection fails or closes before the answer is whole: the
front then retries (nothing relayed yet) or ends the stream in-band.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import cast

import httptools

CONNECT_TIMEOUT_S = 10.0
PAUSE_ABOVE_BYTES = 1 << 20  # stop reading the socket while this much waits for the client


class UpstreamLost(Exception):
    """The upstream connection failed or closed before the answer was whole."""


class Response:
    """One answer: status and headers once `UpstreamPool.request` returns, then its body
    read chunk by chunk with `read`."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []  # names lower-cased
        self.headers_done: asyncio.Future[None] = connection.loop.create_future()
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False
        self.lost: UpstreamLost | None = None
        self.waiter: asyncio.Future[None] | None = None

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)

    async def read(self) -> bytes:
        """The next body bytes as they came; b"" once the body is whole."""
        while not self.chunks:
            if self.complete:
                return b""
            if self.lost is not None:
                raise self.lost
            self.waiter = self._connection.loop.create_future()
            await self.waiter
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self.buffered < PAUSE_ABOVE_BYTES:
            self._connection.resume()
        return chunk

    def close(self) -> None:
        """Done with this answer: its connection goes back to the pool if the answer was
        read whole, else it is closed (the replica sees its client leave)."""
        self._connection.finish(self)

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One kept-alive connection; its answers' parser callbacks fill the current `Response`."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool, self.loop = pool, asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.paused = False
        self.reusable = self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.response is None:  # bytes nobody asked for: not a connection to keep
            self.drop()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamLost(f"malformed answer: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.forget(self)
        self._fail(UpstreamLost(f"connection closed ({exc or 'by the upstream'})"))

    # httptools' callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        self.response.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        assert self.response is not None
        if self.parser.get_status_code() < 200:  # an interim answer (100 Continue): not it
            self.response.headers.clear()
            return
        self.response.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()  # llhttp forgets it once complete
        self.response.headers_done.set_result(None)
        if not self.reusable:  # HEAD: whole now; the parser would wait for its announced body
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        response = self.response
        assert response is not None
        response.chunks.append(body)
        response.buffered += len(body)
        if response.buffered >= PAUSE_ABOVE_BYTES and not self.paused and self.transport:
            self.paused = True
            self.transport.pause_reading()
        response.wake()

    def on_message_complete(self) -> None:
        assert self.response is not None
        if not self.response.status:  # the end of an interim answer
            return
        self.response.complete = True
        self.response.wake()

    def send(self, head: bytes, body: bytes, head_only: bool) -> Response:
        """Send a request; ``head_only``: its answer has no body (HEAD)."""
        assert self.transport is not None
        self.response = Response(self)
        self.reusable = not head_only
        self.transport.write(head + body)  # one send: the body is at most --max-body-bytes
        return self.response

    def resume(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def finish(self, response: Response) -> None:
        if response is not self.response:
            return
        self.response = None
        if response.complete and self.reusable and self.keep_alive:
            self.resume()
            self.pool.release(self)
        else:
            self.drop()

    def _fail(self, lost: UpstreamLost) -> None:
        response = self.response
        if response is not None and not response.complete:
            response.lost = lost
            if not response.headers_done.done():
                response.headers_done.set_exception(lost)
                response.headers_done.exception()  # retrieved: `request` raises it instead
            response.wake()
        self.drop()

    def drop(self) -> None:
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.close()


class UpstreamPool:
    """Kept-alive connections to one ``host:port``; `request` sends on an idle one or a new
    one."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[_Connection] = []

    async def request(
        self, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Response:
        """Send a request; returns once the answer's status and headers are in. Raises
        `UpstreamLost` if the connection fails before them. A kept-alive connection that
        turns out closed before answering (the upstream's idle timeout closed it as it was
        sent) costs one try on a new connection, not an error."""
        head, head_only = self._head(method, target, headers, len(body)), method == "HEAD"
        if self.idle:
            try:
                return await self._exchange(self.idle.pop(), head, body, head_only)
            except UpstreamLost:
                pass  # most likely closed by the upstream's idle timeout: once more, anew
        return await self._exchange(await self._connect(), head, body, head_only)

    @staticmethod
    async def _exchange(
        connection: _Connection, head: bytes, body: bytes, head_only: bool
    ) -> Response:
        response = connection.send(head, body, head_only)
        try:
            await response.headers_done
        except asyncio.CancelledError:  # the caller left: the upstream sees its client leave
            connection.drop()
            raise
        return response

    def _head(
        self, method: str, target: str, headers: list[tuple[bytes, bytes]], length: int
    ) -> bytes:
        lines = [f"{method} {target} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n".encode()]
        lines += [b"%s: %s\r\n" % (name, value) for name, value in headers]
        lines.append(b"content-length: %d\r\n\r\n" % length)
        return b"".join(lines)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self), self.host, self.port),
                CONNECT_TIMEOUT_S,
            )
        except (TimeoutError, OSError) as exc:
            raise UpstreamLost(f"cannot connect to {self.host}:{self.port}: {exc!r}") from exc
        return connection

    def release(self, connection: _Connection) -> None:
        self.idle.append(connection)

    def forget(self, connection: _Connection) -> None:
        if connection in self.idle:
            self.idle.remove(connection)

    def close(self) -> None:
        for connection in list(self.idle):
            connection.drop()
