"""The FastAPI app: OpenAI's chat and text completions (``completions``), models, health and
metrics (``info``), behind the API-key and body-size middleware."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, FastAPI
from starlette.concurrency import run_in_threadpool

from specserve.server import completions, info
from specserve.server.errors import install_error_handlers
from specserve.server.metrics import Metrics
from specserve.server.middleware import APIKeyAuth, BodyLimit
from specserve.server.served import ServedDeployments
from specserve.server.traffic import TrafficLog

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class ServerSettings:
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Opt-in: append each request's prompt (never the output) to this JSONL file, in the
    # format `specserve tune --prompts` reads, to measure drafters on real traffic.
    record_traffic: Path | None = None


def create_app(
    deployments: ServedDeployments,
    settings: ServerSettings = ServerSettings(),
    metrics: Metrics | None = None,
    overrides: APIRouter | None = None,
) -> FastAPI:
    """The app serving ``deployments``; it stops their engines when it shuts down.
    ``overrides`` answers its routes instead of the app's own (a Ray replica that faces the
    clients answers /health and /metrics for all its deployment's replicas)."""
    metrics = metrics or Metrics()
    for name, engine in deployments.engines().items():
        metrics.watch_engine(name, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(deployments.stop)

    app = FastAPI(title="specserve", version="0.1.0", lifespan=lifespan)
    app.state.deployments = deployments
    app.state.metrics = metrics
    app.state.traffic = TrafficLog(settings.record_traffic) if settings.record_traffic else None
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(APIKeyAuth, api_key=settings.api_key)
    if overrides is not None:
        app.include_router(overrides)
    app.include_router(info.router)
    app.include_router(completions.router)
    return app
