"""From the engine's thread to the request's handler: each choice's text pieces, then its
result, through one asyncio queue; and the waits on it that notice a client that went away.

A request with n choices has n engine jobs; every item on the queue carries its choice's
index, so a stream can interleave the choices as they are generated.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

from fastapi import Request

from specserve.engine.job import Job
from specserve.engine.result import GenerationResult
from specserve.engine.scheduler import Engine

DISCONNECT_POLL_SECONDS = 0.25


@dataclass
class Done:
    result: GenerationResult | None
    error: BaseException | None


@dataclass(frozen=True)
class Item:
    index: int  # the choice
    payload: str | Done  # a text piece, or the choice's end


class ChoiceSink:
    """The engine callbacks of one choice."""

    def __init__(self, relay: Relay, index: int) -> None:
        self._relay, self._index = relay, index

    def on_text(self, piece: str) -> None:
        self._relay.put(Item(self._index, piece))

    def on_done(self, result: GenerationResult | None, error: BaseException | None) -> None:
        self._relay.put(Item(self._index, Done(result, error)))


class Relay:
    """Engine callbacks (engine thread) -> an asyncio queue read by the request's handler."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Item] = asyncio.Queue()

    def put(self, item: Item) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: the server is shutting down
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def sink(self, index: int) -> ChoiceSink:
        return ChoiceSink(self, index)

    async def wait(
        self, request: Request, engine: Engine, jobs: Sequence[Job]
    ) -> list[Done] | None:
        """Every choice's end, by index; None (and the jobs cancelled) if the client
        disconnects first."""
        done: dict[int, Done] = {}
        while len(done) < len(jobs):
            try:
                item = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_SECONDS)
            except TimeoutError:
                if await request.is_disconnected():
                    for job in jobs:
                        engine.cancel(job)
                    return None
                continue
            if isinstance(item.payload, Done):
                done[item.index] = item.payload
        return [done[i] for i in range(len(jobs))]
