"""A replica's stream on Ray Serve: events produced faster than ``--stream-interval-ms`` are
joined into one item, the first goes out at once, and a late one is not held back."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("ray", reason="Ray is not installed: pip install 'specserve[ray]'")

from specserve.server.ray_replica import call_asgi

# (seconds after the previous event, body) of an SSE-like response; b"" ends it.
EVENTS = [(0.0, b"a"), (0.01, b"b"), (0.01, b"c"), (0.01, b"d"), (0.6, b"e"), (0.01, b"")]


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    for pause, body in EVENTS:
        await asyncio.sleep(pause)
        await send({"type": "http.response.body", "body": body, "more_body": body != b""})


async def _items(interval: float) -> list[Any]:
    return [item async for item in call_asgi(_app, "POST", "/", b"", [], b"", interval=interval)]


def test_events_within_the_interval_are_joined() -> None:
    start, *body = asyncio.run(_items(0.15))
    # The start with a, at once; b, c, d within 150 ms of it: one item; e came 600 ms later:
    # at once, alone.
    assert start == {"status": 200, "headers": [], "body": b"a"}
    assert body == [b"bcd", b"e"]


def test_no_interval_sends_each_event_alone() -> None:
    start, *body = asyncio.run(_items(0.0))
    assert start["body"] == b"a" and body == [b"b", b"c", b"d", b"e"]


async def _late_first_chunk(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await asyncio.sleep(0.3)  # a long prefill
    await send({"type": "http.response.body", "body": b"a", "more_body": False})


def test_the_start_goes_alone_when_the_first_chunk_is_late() -> None:
    """The client gets its headers after ``start_alone_after``, not after the prefill."""

    async def items() -> list[Any]:
        call = call_asgi(_late_first_chunk, "POST", "/", b"", [], b"", start_alone_after=0.05)
        return [item async for item in call]

    start, *body = asyncio.run(items())
    assert start == {"status": 200, "headers": [], "body": b""} and body == [b"a"]
    assert asyncio.run(_items(0.15))[0]["body"] == b"a"  # an early chunk still rides along
