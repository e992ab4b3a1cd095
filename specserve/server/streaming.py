"""A completion as server-sent events: each choice's deltas as the engine produces them
(interleaved, each chunk naming its choice's ``index``), then its logprobs, its finish, the
usage chunk when asked for, and ``[DONE]``.

Logprobs are not split over the text chunks: the engine streams text pieces, which do not
map onto tokens one to one (a stop string holds text back, a character may span tokens), so
each choice's logprobs come in one chunk just before its finish chunk. Concatenated, the
chunks' ``logprobs.content`` equal the non-streamed answer's.

With tools, each choice's text goes through a `ToolCallStream`: plain content streams as
it comes, a `<tool_call>` block becomes `delta.tool_calls` once it closes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

from specserve.engine.job import Job
from specserve.engine.result import GenerationResult
from specserve.server.call import Call, engine_error
from specserve.server.choices import merge_results
from specserve.server.prepare import Plan
from specserve.server.relay import Relay
from specserve.server.responses import delta_choice, logprobs_of, sse, stream_chunk, usage
from specserve.server.tool_parser import ToolCallStream, tool_finish_reason


class ChoiceStream:
    """One choice's stream: its text pieces in, the choice objects of its chunks out."""

    def __init__(self, kind: str, index: int, plan: Plan) -> None:
        self.kind, self.index, self.plan = kind, index, plan
        tools = plan.tools if kind == "chat" and plan.parses_tool_calls else None
        self.parser = ToolCallStream(parallel=tools.parallel) if tools is not None else None

    def text(self, piece: str) -> list[dict[str, Any]]:
        deltas = self.parser.feed(piece) if self.parser else [{"content": piece}]
        return [delta_choice(self.kind, self.index, d) for d in deltas]

    def end(self, result: GenerationResult) -> list[dict[str, Any]]:
        """What is held back, the logprobs, and the finish."""
        deltas = self.parser.finish() if self.parser else []
        out = [delta_choice(self.kind, self.index, d) for d in deltas]
        logprobs = logprobs_of(self.kind, result, self.plan)
        if logprobs is not None:
            out.append(delta_choice(self.kind, self.index, None, None, logprobs))
        finish = result.finish_reason
        if self.parser is not None:
            finish = tool_finish_reason(self.parser.called, finish)
        out.append(delta_choice(self.kind, self.index, None, finish))
        return out


async def stream_events(
    call: Call, plan: Plan, include_usage: bool, jobs: Sequence[Job], relay: Relay
) -> AsyncIterator[str]:
    """The SSE body of a streamed request; a client that leaves cancels every choice.

    A chat's opening chunks (each choice's ``role``) go out with the first event after them,
    not alone: they carry no text, and behind Ray each write the replica sends costs about
    a millisecond of CPU (docs/ray.md). No text waits for them.
    """
    created = int(time.time())
    opening = ""
    if call.kind == "chat":
        role = {"role": "assistant"}
        opening = "".join(
            _event(call, created, [delta_choice("chat", i, role)]) for i in range(len(jobs))
        )
    # Closed with this generator (a client that leaves): its cleanup frees the sequences now.
    async with contextlib.aclosing(
        _events(call, created, include_usage, jobs, relay, plan)
    ) as events:
        async for chunk in events:
            yield opening + chunk
            opening = ""


def _event(call: Call, created: int, choices: list[dict[str, Any]], **extra: Any) -> str:
    chunk = stream_chunk(call.kind, call.request_id, created, call.served.id, choices)
    return sse({**chunk, **extra})


async def _events(
    call: Call,
    created: int,
    include_usage: bool,
    jobs: Sequence[Job],
    relay: Relay,
    plan: Plan,
) -> AsyncGenerator[str, None]:
    """`stream_events` after the opening chunks."""
    streams = [ChoiceStream(call.kind, i, plan) for i in range(len(jobs))]
    results: dict[int, GenerationResult] = {}
    finished = False
    try:
        while len(results) < len(jobs):
            item = await relay.queue.get()
            if isinstance(item.payload, str):
                for choice in streams[item.index].text(item.payload):
                    yield _event(call, created, [choice])
                continue
            done = item.payload
            if done.error is not None or done.result is None:
                finished = True
                _cancel(call, jobs)
                call.record("error")
                yield sse(engine_error(done.error or RuntimeError("no result")).body())
                break
            result = results[item.index] = done.result
            for choice in streams[item.index].end(result):
                yield _event(call, created, [choice])
        else:
            finished = True
            ordered = [results[i] for i in range(len(jobs))]
            call.record("ok", merge_results(ordered))
            if include_usage:
                yield _event(call, created, [], usage=usage(ordered, call.served))
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client disconnected mid-stream: free the sequences now
            _cancel(call, jobs)
            call.record("cancelled")


def _cancel(call: Call, jobs: Sequence[Job]) -> None:
    for job in jobs:
        call.served.engine.cancel(job)
