"""The front's lean HTTP/1.1 client (`server.upstream`) against a server scripted in bytes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

pytest.importorskip("httptools", reason="the front comes with Ray: pip install 'specserve[ray]'")
from specserve.server.upstream import Response, UpstreamLost, UpstreamPool
from tests.server_harness import free_port

Reply = Callable[[bytes, asyncio.StreamWriter], Awaitable[bool]]  # False: close the connection


class Scripted:
    """Reads each request (head and content-length body) and answers with ``reply``."""

    def __init__(self, reply: Reply) -> None:
        self.reply, self.requests, self.connections = reply, list[bytes](), 0
        self.closed = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = next(
                    int(line.split(b":")[1])
                    for line in head.lower().split(b"\r\n")
                    if line.startswith(b"content-length:")
                )
                self.requests.append(head + await reader.readexactly(length))
                if not await self.reply(self.requests[-1], writer):
                    break
        except asyncio.IncompleteReadError:
            pass
        writer.close()
        self.closed.set()


async def _serve(reply: Reply) -> tuple[Scripted, UpstreamPool, asyncio.Server]:
    scripted, port = Scripted(reply), free_port()
    server = await asyncio.start_server(scripted.handle, "127.0.0.1", port)
    return scripted, UpstreamPool("127.0.0.1", port), server


async def _body(response: Response) -> bytes:
    parts = []
    while chunk := await response.read():
        parts.append(chunk)
    response.close()
    return b"".join(parts)


async def _ok(request: bytes, writer: asyncio.StreamWriter) -> bool:
    body = b"you sent " + request.split(b"\r\n\r\n", 1)[1]
    writer.write(b"HTTP/1.1 200 OK\r\nX-Seen: 1\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
    return True


def test_requests_go_out_whole_and_connections_are_kept_alive() -> None:
    async def run() -> None:
        scripted, pool, server = await _serve(_ok)
        for i in range(3):
            response = await pool.request("POST", f"/v1/x?i={i}", [(b"a", b"b")], b"body%d" % i)
            assert (response.status, response.header(b"x-seen")) == (200, b"1")
            assert await _body(response) == b"you sent body%d" % i
        assert scripted.connections == 1
        head = scripted.requests[2].split(b"\r\n")
        assert head[0] == b"POST /v1/x?i=2 HTTP/1.1"
        assert b"a: b" in head and b"content-length: 5" in head
        pool.close()
        server.close()

    asyncio.run(run())


def test_a_chunked_body_comes_as_sent_and_a_large_one_survives_a_slow_reader() -> None:
    big = bytes(range(256)) * 12_000  # 3 MB: the socket is paused and resumed on the way

    async def reply(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for piece in (b"data: 1\n\n", b"data: 2\n\n", big):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        return True

    async def run() -> None:
        _, pool, server = await _serve(reply)
        response = await pool.request("GET", "/", [], b"")
        await asyncio.sleep(0.3)  # the whole body arrives while nobody reads
        assert await _body(response) == b"data: 1\n\ndata: 2\n\n" + big
        assert len(pool.idle) == 1  # read whole: reusable, and reading again
        again = await pool.request("GET", "/", [], b"")
        assert await asyncio.wait_for(_body(again), 10) == b"data: 1\n\ndata: 2\n\n" + big
        server.close()

    asyncio.run(run())


def test_a_body_cut_short_raises_and_its_connection_is_not_reused() -> None:
    async def reply(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b")
        return False

    async def run() -> None:
        _, pool, server = await _serve(reply)
        response = await pool.request("POST", "/", [], b"")
        assert await response.read() == b"only ten b"
        with pytest.raises(UpstreamLost):
            await response.read()
        response.close()
        assert pool.idle == []
        server.close()

    asyncio.run(run())


def test_a_kept_alive_connection_closed_as_it_is_used_costs_a_new_one_not_an_error() -> None:
    closed: list[bytes] = []

    async def reply(request: bytes, writer: asyncio.StreamWriter) -> bool:
        if b"/second" in request and not closed:  # the idle timeout, as the request arrives
            closed.append(request)
            return False
        return await _ok(request, writer)

    async def run() -> None:
        scripted, pool, server = await _serve(reply)
        await _body(await pool.request("POST", "/first", [], b"1"))
        response = await pool.request("POST", "/second", [], b"2")  # closed: sent again
        assert scripted.connections == 2 and response.status == 200
        server.close()

    asyncio.run(run())


def test_an_interim_100_continue_is_not_taken_for_the_answer() -> None:
    async def reply(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return await _ok(request, writer)

    async def run() -> None:
        _, pool, server = await _serve(reply)
        for _ in range(2):  # and the connection stays in step for the next request
            response = await pool.request("POST", "/", [], b"x")
            assert response.status == 200 and await _body(response) == b"you sent x"
        server.close()

    asyncio.run(run())


def test_a_caller_that_leaves_before_the_answer_closes_the_connection() -> None:
    async def reply(request: bytes, writer: asyncio.StreamWriter) -> bool:
        return True  # a long prefill: no answer yet

    async def run() -> None:
        scripted, pool, server = await _serve(reply)
        waiting = asyncio.ensure_future(pool.request("POST", "/", [], b"x"))
        await asyncio.sleep(0.1)
        waiting.cancel()
        await asyncio.wait_for(scripted.closed.wait(), 5)  # the upstream saw its client leave
        assert pool.idle == []
        server.close()

    asyncio.run(run())


def test_head_answers_end_at_their_headers_and_no_upstream_is_a_clear_error() -> None:
    async def reply(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
        return True

    async def run() -> None:
        _, pool, server = await _serve(reply)
        response = await asyncio.wait_for(pool.request("HEAD", "/", [], b""), 5)
        assert response.status == 200 and await asyncio.wait_for(response.read(), 5) == b""
        server.close()
        with pytest.raises(UpstreamLost, match="cannot connect"):
            await UpstreamPool("127.0.0.1", free_port()).request("GET", "/", [], b"")

    asyncio.run(run())
