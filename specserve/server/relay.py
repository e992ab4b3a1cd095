"""From the engine's thread to the request's handler: text pieces, then the result, through an
asyncio queue; and the waits on it that notice a client that went away."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from fastapi import Request

from specserve.engine.result import GenerationResult
from specserve.engine.scheduler import Engine, Job

DISCONNECT_POLL_SECONDS = 0.25


@dataclass
class Done:
    result: GenerationResult | None
    error: BaseException | None


class Relay:
    """Engine callbacks (engine thread) -> an asyncio queue read by the request's handler."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[str | Done] = asyncio.Queue()

    def _put(self, item: str | Done) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: the server is shutting down
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def on_text(self, piece: str) -> None:
        self._put(piece)

    def on_done(self, result: GenerationResult | None, error: BaseException | None) -> None:
        self._put(Done(result, error))

    async def wait(self, request: Request, engine: Engine, job: Job) -> Done | None:
        """The job's end; None (and the job cancelled) if the client disconnects first."""
        while True:
            try:
                item = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_SECONDS)
            except TimeoutError:
                if await request.is_disconnected():
                    engine.cancel(job)
                    return None
                continue
            if isinstance(item, Done):
                return item
