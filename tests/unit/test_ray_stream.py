"""A replica's stream on Ray Serve: events produced faster than ``--stream-interval-ms`` are
joined into one item, the first goes out at once, a late one is not held back, and the last
says so."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("ray", reason="Ray is not installed: pip install 'specserve[ray]'")

from specserve.server.ray_replica import STREAM_INTERVAL_CAP_S, call_asgi, stream_interval_for

# (seconds after the previous event, body) of an SSE-like response; b"" ends it.
EVENTS = [(0.0, b"a"), (0.01, b"b"), (0.01, b"c"), (0.01, b"d"), (0.6, b"e"), (0.01, b"")]
END = {"body": b"", "last": True}  # the body's last chunk (here empty): marked as such


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    for pause, body in EVENTS:
        await asyncio.sleep(pause)
        await send({"type": "http.response.body", "body": body, "more_body": body != b""})


async def _items(interval: float | Callable[[], float]) -> list[Any]:
    return [item async for item in call_asgi(_app, "POST", "/", b"", [], b"", interval=interval)]


def test_events_within_the_interval_are_joined() -> None:
    start, *body = asyncio.run(_items(0.15))
    # The start with a, at once; b, c, d within 150 ms of it: one item; e came 600 ms later:
    # at once, alone.
    assert start == {"status": 200, "headers": [], "body": b"a", "last": False}
    assert body == [b"bcd", b"e", END]


def test_no_interval_sends_each_event_alone() -> None:
    start, *body = asyncio.run(_items(0.0))
    assert start["body"] == b"a" and body == [b"b", b"c", b"d", b"e", END]


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
    assert start == {"status": 200, "headers": [], "body": b"", "last": False}
    assert body == [{"body": b"a", "last": True}]
    assert asyncio.run(_items(0.15))[0]["body"] == b"a"  # an early chunk still rides along


def test_the_interval_is_asked_at_each_item() -> None:
    """A replica's interval follows its open streams while a stream runs: asked per item."""
    asked: list[int] = []

    def interval() -> float:
        asked.append(1)
        return 0.15 if len(asked) <= 2 else 0.0  # the start's item and b's wait; e's none

    start, *body = asyncio.run(_items(interval))
    assert start["body"] == b"a" and body == [b"bcd", b"e", END]
    assert len(asked) == 4  # at a, b, e and the closing empty chunk: each item's start


async def _whole(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}", "more_body": False})


def test_a_whole_answer_is_one_item_marked_last() -> None:
    """A JSON answer (or a stream the engine finished at once): the start, the body and the
    end as one item, so the ingress answers without waiting for the end of Ray's stream."""

    async def items() -> list[Any]:
        return [item async for item in call_asgi(_whole, "POST", "/", b"", [], b"")]

    assert asyncio.run(items()) == [{"status": 200, "headers": [], "body": b"{}", "last": True}]


def test_the_interval_grows_with_open_streams_up_to_the_cap() -> None:
    assert stream_interval_for(0.02, 0) == stream_interval_for(0.02, 1) == 0.02
    assert stream_interval_for(0.02, 3) == pytest.approx(0.06)
    assert stream_interval_for(0.02, 50) == STREAM_INTERVAL_CAP_S
    assert stream_interval_for(0.0, 8) == 0.0  # every event alone stays so
    assert stream_interval_for(0.5, 8) == 0.5  # a flag above the cap is the user's choice
