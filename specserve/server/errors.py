"""Errors in OpenAI's JSON shape: ``{"error": {"message", "type", "param", "code"}}``.

Clients (the official ``openai`` package among them) read this shape to raise their typed
exceptions; a stack trace is never sent, unexpected failures are logged here instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered to the client as it is."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def body(self) -> dict[str, dict[str, str | None]]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, dict[str, str | None]]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def model_not_found(name: object, known: Iterable[str]) -> APIError:
    """404: ``model`` names no served deployment (nor a model with a default one)."""
    listed = ", ".join(sorted(known)) or "none"
    return APIError(
        404,
        f"The model '{name}' does not exist: name a deployment ({listed})",
        "invalid_request_error",
        "model",
        "model_not_found",
    )


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """400: the request cannot be served as written."""
    return APIError(400, message, "invalid_request_error", param, code)


REPLICA_LOST = "the replica serving this request stopped ({error}); please retry"


def replica_lost(error: str) -> APIError:
    """The 503 (or in-band stream error) of a request whose replica stopped mid-way."""
    message = REPLICA_LOST.format(error=error)
    return APIError(503, message, "server_error", code="replica_unavailable")


def _field_path(problem: dict[str, Any]) -> list[str]:
    """A pydantic problem's location as the client's parameter path: field names and list
    indices only (pydantic also names union branches: "str", "function-after[...]")."""
    return [
        str(part)
        for part in problem.get("loc", ())
        if part != "body" and not (isinstance(part, str) and ("[" in part or part == "str"))
    ]


def _reported_problem(problems: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The first problem, unless it is a text-or-list field's "not a string" and the list
    branch says more: an image part sent as message content is then reported at its
    part's type, not as "Input should be a valid string"."""
    first = problems[0] if problems else {}
    if first.get("type") != "string_type":
        return first
    path = _field_path(first)
    depth, deepest = len(path), first
    for problem in problems[1:]:
        under = _field_path(problem)
        if len(under) > depth and under[: len(path)] == path:
            depth, deepest = len(under), problem
    return deepest


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        first = _reported_problem(problems)
        where = _field_path(first)
        param = ".".join(where) or None
        detail = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":  # its location is a position in the text
            message, param = "the request body is not valid JSON", None
        elif not where:
            message = "the request body must be a JSON object (Content-Type: application/json)"
        else:
            message = f"invalid value for '{param}': {detail}" if param else detail
        if len(problems) > 1:
            message += f" (and {len(problems) - 1} more problem(s))"
        return JSONResponse(error_body(message, "invalid_request_error", param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(message, kind), exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        body = error_body("internal server error (details are in the server log)", "server_error")
        return JSONResponse(body, 500)
