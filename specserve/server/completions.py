"""POST /v1/chat/completions and /v1/completions: request -> engine job -> answer or stream.

Model compute runs in the engines' threads; the handler only tokenizes (in a worker thread),
queues, and relays text as the engine produces it, so the event loop never blocks on a
forward. A client that disconnects — streaming or not — has its sequence cancelled at once.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from specserve.engine.scheduler import EngineStoppedError, Job, QueueFullError
from specserve.server.errors import APIError, invalid
from specserve.server.metrics import Metrics
from specserve.server.relay import Relay
from specserve.server.responses import completion_response, sse, stream_chunk
from specserve.server.schemas import (
    ChatCompletionRequest,
    CommonRequest,
    CompletionRequest,
    join_text,
)
from specserve.server.served import ServedDeployment
from specserve.speculative.sampling import MAX_TOKENS_LIMIT, InvalidRequestError, SamplingParams

router = APIRouter()


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await _complete(request, body, "chat")


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await _complete(request, body, "text")


@dataclass(frozen=True)
class Call:
    """One accepted request: where it runs and how its answer is named and counted."""

    kind: str  # "chat" or "text"
    served: ServedDeployment
    metrics: Metrics
    request_id: str

    @property
    def endpoint(self) -> str:
        return "chat.completions" if self.kind == "chat" else "completions"

    def record(self, outcome: str, result: Any = None) -> None:
        self.metrics.record_request(self.served.id, self.endpoint, outcome, result)


async def _complete(request: Request, body: CommonRequest, kind: str) -> Response:
    body.check()
    state = request.app.state
    served: ServedDeployment = state.deployments.lookup(body.model)
    if state.traffic is not None:
        await run_in_threadpool(state.traffic.record, served.id, body)
    params = _sampling_params(body)
    prompt_ids = await _prompt_ids(body, served)
    _check_room(body, len(prompt_ids), served.engine.context_limit)
    prediction_ids = None
    if body.prediction is not None:
        text = join_text(body.prediction.content)
        tokenizer = served.engine.model.tokenizer
        prediction_ids = await run_in_threadpool(tokenizer.encode, text, add_special_tokens=False)
    relay = Relay()
    job = _submit(served, kind, prompt_ids, params, prediction_ids, relay)
    call = Call(
        kind, served, state.metrics, ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
    )
    if body.stream:
        events = _stream(call, body.include_usage, job, relay)
        return StreamingResponse(events, media_type="text/event-stream")
    done = await relay.wait(request, served.engine, job)
    if done is None:  # the client went away; nobody reads an answer
        call.record("cancelled")
        return Response(status_code=499)
    if done.error is not None or done.result is None:
        call.record("error")
        raise engine_error(done.error or RuntimeError("no result"))
    call.record("ok", done.result)
    return JSONResponse(completion_response(kind, call.request_id, served, done.result))


async def _prompt_ids(body: CommonRequest, served: ServedDeployment) -> list[int]:
    tokenizer = served.engine.model.tokenizer
    if isinstance(body, ChatCompletionRequest):
        return await run_in_threadpool(tokenizer.encode_chat, body.chat_messages())
    assert isinstance(body, CompletionRequest)
    prompt = body.prompt_input()
    if isinstance(prompt, str):
        return await run_in_threadpool(tokenizer.encode, prompt)
    return list(prompt)


def _submit(
    served: ServedDeployment,
    kind: str,
    prompt_ids: list[int],
    params: SamplingParams,
    prediction_ids: list[int] | None,
    relay: Relay,
) -> Job:
    """Queue the sequence; the engine's refusals become OpenAI errors."""
    try:
        return served.engine.submit(
            prompt_ids,
            params,
            relay.on_text,
            relay.on_done,
            spec=served.spec,
            prediction_ids=prediction_ids,
        )
    except InvalidRequestError as exc:
        code = "context_length_exceeded" if "context window" in str(exc) else None
        param = "messages" if kind == "chat" else "prompt"
        raise invalid(str(exc), param, code) from None
    except QueueFullError as exc:
        raise APIError(429, str(exc), "rate_limit_error", code="queue_full") from None
    except EngineStoppedError as exc:
        raise engine_error(exc) from None


async def _stream(call: Call, include_usage: bool, job: Job, relay: Relay) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(*args: Any) -> dict[str, Any]:
        return stream_chunk(call.kind, call.request_id, created, call.served.id, *args)

    finished = False
    try:
        if call.kind == "chat":
            yield sse(chunk({"role": "assistant"}))
        while True:
            item = await relay.queue.get()
            if isinstance(item, str):
                yield sse(chunk(item))
                continue
            finished = True
            if item.error is not None or item.result is None:
                call.record("error")
                yield sse(engine_error(item.error or RuntimeError("no result")).body())
                break
            call.record("ok", item.result)
            yield sse(chunk(None, item.result.finish_reason))
            if include_usage:
                yield sse(chunk(None, None, item.result, call.served))
            break
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client disconnected mid-stream: free the sequence now
            call.served.engine.cancel(job)
            call.record("cancelled")


def engine_error(error: BaseException) -> APIError:
    """An engine failure as an OpenAI error (details of the unexpected ones stay in the log)."""
    if isinstance(error, EngineStoppedError):
        return APIError(503, str(error), "server_error", code="shutting_down")
    if isinstance(error, (InvalidRequestError, ValueError)):
        return invalid(str(error))
    return APIError(500, "internal server error (details are in the server log)", "server_error")


def _check_room(body: CommonRequest, prompt_tokens: int, context: int) -> None:
    """A ``max_tokens`` the context cannot hold after the prompt is a 400 with the numbers,
    as OpenAI answers (it is not silently cut to the room that is left)."""
    asked = (
        body.token_limit() if isinstance(body, (ChatCompletionRequest, CompletionRequest)) else None
    )
    if asked is not None and prompt_tokens + asked > context:
        raise invalid(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_tokens + asked} tokens ({prompt_tokens} in the prompt, {asked} in the "
            f"completion); max_tokens can be at most {context - prompt_tokens} for this prompt.",
            "max_tokens",
            "context_length_exceeded",
        )


def _sampling_params(body: CommonRequest) -> SamplingParams:
    limit = (
        body.token_limit() if isinstance(body, (ChatCompletionRequest, CompletionRequest)) else None
    )
    try:
        return SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,  # OpenAI's default
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            max_tokens=min(limit or MAX_TOKENS_LIMIT, MAX_TOKENS_LIMIT),
            stop=body.stop_strings(),
        )
    except InvalidRequestError as exc:
        raise invalid(str(exc)) from None
