"""GET /health, /v1/models, /v1/models/{id} and /metrics (Prometheus text)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    return {"status": "ok", "deployments": sorted(request.app.state.deployments.by_id)}


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    served = request.app.state.deployments.by_id.values()
    return {"object": "list", "data": [s.describe() for s in served]}


@router.get("/v1/models/{model_id}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    described: dict[str, Any] = request.app.state.deployments.lookup(model_id).describe()
    return described


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    metrics = request.app.state.metrics
    return Response(metrics.render(), media_type=metrics.content_type)
