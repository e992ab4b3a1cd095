"""The FastAPI app: OpenAI's chat and text completions, models, health and metrics.

Model compute runs in the engines' threads; the event loop only tokenizes (in a worker
thread), queues, and relays text as the engine produces it, so it never blocks on a forward.
A client that disconnects — streaming or not — has its sequence cancelled at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from specserve.engine.result import GenerationResult
from specserve.engine.sampling import MAX_TOKENS_LIMIT, InvalidRequestError, SamplingParams
from specserve.engine.scheduler import EngineStoppedError, Job, QueueFullError
from specserve.server.errors import APIError, install_error_handlers, invalid
from specserve.server.metrics import Metrics
from specserve.server.middleware import APIKeyAuth, BodyLimit
from specserve.server.responses import completion_response, sse, stream_chunk
from specserve.server.schemas import (
    ChatCompletionRequest,
    CommonRequest,
    CompletionRequest,
    join_text,
)
from specserve.server.served import ServedDeployment, ServedDeployments

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DISCONNECT_POLL_SECONDS = 0.25


@dataclass(frozen=True)
class ServerSettings:
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Opt-in: append each request's prompt (never the output) to this JSONL file, in the
    # format `specserve tune --prompts` reads, to measure drafters on real traffic.
    record_traffic: Path | None = None


class TrafficLog:
    """Appends one JSON line per request: time, deployment, messages or prompt, prediction."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()

    def record(self, deployment: str, body: CommonRequest) -> None:
        row: dict[str, Any] = {"time": round(time.time(), 3), "deployment": deployment}
        if isinstance(body, ChatCompletionRequest):
            row["messages"] = body.chat_messages()
        elif isinstance(body, CompletionRequest):
            prompt = body.prompt_input()
            row["prompt" if isinstance(prompt, str) else "prompt_token_ids"] = prompt
        if body.prediction is not None:
            row["prediction"] = join_text(body.prediction.content)
        line = json.dumps(row, ensure_ascii=False) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as handle:
            handle.write(line)


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


def _engine_error(error: BaseException) -> APIError:
    if isinstance(error, EngineStoppedError):
        return APIError(503, str(error), "server_error", code="shutting_down")
    if isinstance(error, (InvalidRequestError, ValueError)):
        return invalid(str(error))
    return APIError(500, "internal server error (details are in the server log)", "server_error")


def create_app(
    deployments: ServedDeployments,
    settings: ServerSettings = ServerSettings(),
    metrics: Metrics | None = None,
) -> FastAPI:
    metrics = metrics or Metrics()
    traffic = TrafficLog(settings.record_traffic) if settings.record_traffic else None
    for name, engine in deployments.engines().items():
        metrics.watch_engine(name, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(deployments.stop)

    app = FastAPI(title="specserve", version="0.1.0", lifespan=lifespan)
    app.state.deployments = deployments
    app.state.metrics = metrics
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(APIKeyAuth, api_key=settings.api_key)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "deployments": sorted(deployments.by_id)}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [s.describe() for s in deployments.by_id.values()]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str) -> dict[str, Any]:
        return deployments.lookup(model_id).describe()

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _complete(request, body, "chat")

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _complete(request, body, "text")

    async def _complete(request: Request, body: CommonRequest, kind: str) -> Response:
        body.check()
        served = deployments.lookup(body.model)
        if traffic is not None:
            await run_in_threadpool(traffic.record, served.id, body)
        tokenizer = served.engine.model.tokenizer
        params = _sampling_params(body)
        if isinstance(body, ChatCompletionRequest):
            prompt_ids = await run_in_threadpool(tokenizer.encode_chat, body.chat_messages())
        else:
            assert isinstance(body, CompletionRequest)
            prompt = body.prompt_input()
            if isinstance(prompt, str):
                prompt_ids = await run_in_threadpool(tokenizer.encode, prompt)
            else:
                prompt_ids = list(prompt)
        _check_room(body, len(prompt_ids), served.engine.context_limit)
        prediction_ids = None
        if body.prediction is not None:
            text = join_text(body.prediction.content)
            prediction_ids = await run_in_threadpool(
                tokenizer.encode, text, add_special_tokens=False
            )
        relay = Relay()
        try:
            job = served.engine.submit(
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
            raise _engine_error(exc) from None
        endpoint = "chat.completions" if kind == "chat" else "completions"
        request_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        if body.stream:
            events = _stream(request_id, kind, endpoint, body, served, job, relay)
            return StreamingResponse(events, media_type="text/event-stream")
        done = await _wait(request, served, job, relay)
        if done is None:  # the client went away; nobody reads an answer
            metrics.record_request(served.id, endpoint, "cancelled", None)
            return Response(status_code=499)
        if done.error is not None or done.result is None:
            metrics.record_request(served.id, endpoint, "error", None)
            raise _engine_error(done.error or RuntimeError("no result"))
        metrics.record_request(served.id, endpoint, "ok", done.result)
        return JSONResponse(completion_response(kind, request_id, served, done.result))

    async def _wait(
        request: Request, served: ServedDeployment, job: Job, relay: Relay
    ) -> Done | None:
        while True:
            try:
                item = await asyncio.wait_for(relay.queue.get(), DISCONNECT_POLL_SECONDS)
            except TimeoutError:
                if await request.is_disconnected():
                    served.engine.cancel(job)
                    return None
                continue
            if isinstance(item, Done):
                return item

    async def _stream(
        request_id: str,
        kind: str,
        endpoint: str,
        body: CommonRequest,
        served: ServedDeployment,
        job: Job,
        relay: Relay,
    ) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(*args: Any) -> dict[str, Any]:
            return stream_chunk(kind, request_id, created, served.id, *args)

        finished = False
        try:
            if kind == "chat":
                yield sse(chunk({"role": "assistant"}))
            while True:
                item = await relay.queue.get()
                if isinstance(item, str):
                    yield sse(chunk(item))
                    continue
                finished = True
                if item.error is not None or item.result is None:
                    metrics.record_request(served.id, endpoint, "error", None)
                    yield sse(_engine_error(item.error or RuntimeError("no result")).body())
                    break
                result = item.result
                metrics.record_request(served.id, endpoint, "ok", result)
                yield sse(chunk(None, result.finish_reason))
                if body.include_usage:
                    yield sse(chunk(None, None, result, served))
                break
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client disconnected mid-stream: free the sequence now
                served.engine.cancel(job)
                metrics.record_request(served.id, endpoint, "cancelled", None)

    return app


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
