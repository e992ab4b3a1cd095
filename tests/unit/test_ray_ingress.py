"""The Ray ingress's handling of a lost replica, with stand-in handles (no Ray cluster): a
failure before anything reached the client is retried once, then answered with OpenAI's 503;
a failure mid-stream ends the stream with an in-band error event. Both of Ray's transports
fail their own way: Ray's errors, or gRPC's (the fast path) that Ray passes on untranslated.
An answer ends at the item marked last, before Ray's stream ends."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from fastapi.testclient import TestClient
from ray.exceptions import ActorDiedError

from specserve.deployments.store import Deployment
from specserve.server.ray_ingress import Ingress, build_app

START = {"status": 200, "headers": [("content-type", "text/event-stream")], "body": b"data: 1\n\n"}


def grpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "boom")


class Stream:
    """A replica's answer: ``items`` in turn, each an item to yield or an error to raise."""

    def __init__(self, items: list[Any]) -> None:
        self.items, self.cancelled = list(items), False

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Any:
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True


class Handle:
    """A Serve handle whose calls answer with the given streams, one per call."""

    def __init__(self, streams: list[Stream]) -> None:
        self.streams = streams
        self.handle = self

    def options(self, **_: Any) -> Handle:
        return self

    def remote(self, *_: Any) -> Stream:
        return self.streams.pop(0)


def client_for(streams: list[Stream]) -> TestClient:
    engines: dict[str, Any] = {"d": Handle(streams)}
    ingress = Ingress([Deployment("d", "m")], None, 1 << 20, hub=None, engines=engines)
    return TestClient(build_app(ingress))


def post(client: TestClient) -> Any:
    return client.post("/v1/chat/completions", json={"model": "d", "messages": [], "stream": True})


LOST: list[Callable[[], BaseException]] = [
    lambda: ActorDiedError(),
    lambda: grpc_error(grpc.StatusCode.UNKNOWN),
    lambda: grpc_error(grpc.StatusCode.UNAVAILABLE),
]


@pytest.mark.parametrize("lost", LOST)
def test_lost_before_answering_is_retried_once(lost: Callable[[], BaseException]) -> None:
    first, second = Stream([lost()]), Stream([START, b"data: 2\n\n"])
    answer = post(client_for([first, second]))
    assert answer.status_code == 200 and answer.text == "data: 1\n\ndata: 2\n\n"
    assert first.cancelled and not second.cancelled


@pytest.mark.parametrize("lost", LOST)
def test_lost_twice_is_a_503_in_openais_shape(lost: Callable[[], BaseException]) -> None:
    answer = post(client_for([Stream([lost()]), Stream([lost()])]))
    assert answer.status_code == 503
    error = answer.json()["error"]
    assert error["code"] == "replica_unavailable" and "please retry" in error["message"]


def test_lost_mid_stream_ends_it_with_an_error_event() -> None:
    stream = Stream([START, b"data: 2\n\n", grpc_error(grpc.StatusCode.UNKNOWN)])
    answer = post(client_for([stream]))
    events = answer.text.split("\n\n")
    assert events[:2] == ["data: 1", "data: 2"] and events[-2:] == ["data: [DONE]", ""]
    error = json.loads(events[2].removeprefix("data: "))["error"]
    assert error["code"] == "replica_unavailable" and "gRPC UNKNOWN" in error["message"]
    assert stream.cancelled  # it did not end normally: the replica is told (if it still runs)


class HeldEnd(Stream):
    """A stream whose end, after its items, waits for ``release`` (at most 10 s): Ray's
    end-of-stream message comes after the last item, a round trip later."""

    def __init__(self, items: list[Any]) -> None:
        super().__init__(items)
        self.release, self.ended = threading.Event(), False

    async def __anext__(self) -> Any:
        if not self.items:
            await asyncio.to_thread(self.release.wait, 10)
            self.ended = True
        return await super().__anext__()


@pytest.mark.parametrize(
    ("items", "text"),
    [
        ([{**START, "last": True}], "data: 1\n\n"),  # whole in one item
        (
            [START, b"data: 2\n\n", {"body": b"data: 3\n\n", "last": True}],
            "data: 1\n\ndata: 2\n\ndata: 3\n\n",
        ),
    ],
)
def test_the_answer_ends_at_the_item_marked_last(items: list[Any], text: str) -> None:
    stream = HeldEnd(items)
    with client_for([stream]) as client:
        answer = post(client)
        assert answer.status_code == 200
        assert not stream.ended  # the client had its whole answer before the stream's end
        stream.release.set()
        deadline = time.monotonic() + 10
        while not stream.ended and time.monotonic() < deadline:
            time.sleep(0.01)
    assert stream.ended and not stream.cancelled  # read to its end in the background
    assert answer.text == text
