"""POST /v1/chat/completions and /v1/completions: request -> engine jobs -> answer or stream.

Model compute runs in the engines' threads; the handler only tokenizes and compiles grammars
(in a worker thread), queues one job per choice, and relays text as the engine produces it,
so the event loop never blocks on a forward. A client that disconnects — streaming or not —
has its sequences cancelled at once.

With n > 1 the first choice is submitted as usual and the others with
``share_prefill_with`` the first: they copy its prompt KV instead of computing it again.
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from specserve.engine.job import EngineStoppedError, Job, QueueFullError
from specserve.engine.result import GenerationResult
from specserve.server.call import Call, engine_error
from specserve.server.choices import merge_results
from specserve.server.errors import APIError, invalid
from specserve.server.prepare import Plan, prepare
from specserve.server.relay import Relay
from specserve.server.responses import completion_response
from specserve.server.schemas import ChatCompletionRequest, CommonRequest, CompletionRequest
from specserve.server.served import ServedDeployment
from specserve.server.streaming import stream_events
from specserve.speculative.sampling import InvalidRequestError

router = APIRouter()


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await _complete(request, body, "chat")


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await _complete(request, body, "text")


async def _complete(request: Request, body: CommonRequest, kind: str) -> Response:
    body.check()
    state = request.app.state
    served: ServedDeployment = state.deployments.lookup(body.model)
    if state.traffic is not None:
        await run_in_threadpool(state.traffic.record, served.id, body)
    plan = await run_in_threadpool(prepare, body, served.engine.model)
    _check_room(body, len(plan.prompt_ids), served.engine.context_limit)
    relay = Relay()
    jobs = _submit(served, kind, plan, relay)
    call = Call(
        kind, served, state.metrics, ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
    )
    if body.stream:
        events = stream_events(call, plan, body.include_usage, jobs, relay)
        return StreamingResponse(events, media_type="text/event-stream")
    done = await relay.wait(request, served.engine, jobs)
    if done is None:  # the client went away; nobody reads an answer
        call.record("cancelled")
        return Response(status_code=499)
    results: list[GenerationResult] = []
    for choice in done:
        if choice.error is not None or choice.result is None:
            call.record("error")
            raise engine_error(choice.error or RuntimeError("no result"))
        results.append(choice.result)
    call.record("ok", merge_results(results))
    return JSONResponse(completion_response(kind, call.request_id, served, results, plan))


def _submit(served: ServedDeployment, kind: str, plan: Plan, relay: Relay) -> list[Job]:
    """Queue one sequence per choice (all or none); the engine's refusals become OpenAI
    errors."""
    jobs: list[Job] = []
    try:
        for index in range(plan.n):
            sink = relay.sink(index)
            job = served.engine.submit(
                plan.prompt_ids,
                plan.choice_params(index),
                sink.on_text,
                sink.on_done,
                speculation=served.speculation,
                prediction_ids=plan.prediction_ids,
                share_prefill_with=jobs[0] if jobs else None,
            )
            jobs.append(job)
    except (InvalidRequestError, QueueFullError, EngineStoppedError) as exc:
        for job in jobs:
            served.engine.cancel(job)
        raise _refusal(exc, kind) from None
    return jobs


def _refusal(exc: Exception, kind: str) -> APIError:
    if isinstance(exc, InvalidRequestError):
        code = "context_length_exceeded" if "context window" in str(exc) else None
        return invalid(str(exc), "messages" if kind == "chat" else "prompt", code)
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), "rate_limit_error", code="queue_full")
    return engine_error(exc)


def _check_room(body: CommonRequest, prompt_tokens: int, context: int) -> None:
    """A ``max_tokens`` the context cannot hold after the prompt is a 400 with the numbers,
    as OpenAI answers (it is not silently cut to the room that is left)."""
    asked = body.token_limit()
    if asked is not None and prompt_tokens + asked > context:
        raise invalid(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_tokens + asked} tokens ({prompt_tokens} in the prompt, {asked} in the "
            f"completion); max_tokens can be at most {context - prompt_tokens} for this prompt.",
            "max_tokens",
            "context_length_exceeded",
        )
