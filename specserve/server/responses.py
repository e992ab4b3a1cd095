"""Response bodies in OpenAI's shapes: completions, streamed chunks, and usage.

``usage`` carries OpenAI's ``completion_tokens_details`` (accepted / rejected prediction
tokens) plus a ``speculation`` object of our own: which drafter ran and how well it did.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from specserve.engine.result import GenerationResult

if TYPE_CHECKING:
    from specserve.server.served import ServedDeployment


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def usage(result: GenerationResult, served: ServedDeployment) -> dict[str, Any]:
    completion = len(result.token_ids)
    prediction = result.prediction
    stats = result.stats
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": result.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "accepted_prediction_tokens": prediction.accepted_prediction_tokens
            if prediction
            else 0,
            "rejected_prediction_tokens": prediction.rejected_prediction_tokens
            if prediction
            else 0,
        },
        "speculation": {
            "method": served.drafter.method or "none",
            "drafter_source": served.drafter.source,
            "prediction": prediction is not None,
            "proposed": stats.proposed,
            "accepted": stats.accepted,
            "target_steps": stats.target_steps,
            # Tokens emitted per target forward (1.0 = plain decoding).
            "mean_accepted_length": round(stats.tokens_per_step, 4),
            "by_method": {name: m.as_dict() for name, m in stats.by_method.items()},
            "time_to_first_token": round(result.time_to_first_token, 4),
            "decode_tokens_per_second": round(result.decode_tokens_per_second, 2),
        },
    }


OBJECTS = {
    "chat": ("chat.completion", "chat.completion.chunk"),
    "text": ("text_completion", "text_completion"),
}


def _choice(
    kind: str, content: str | dict[str, str] | None, finish: str | None, whole: bool
) -> dict:
    """One choice: a chat message or delta, or a completion's text."""
    choice: dict[str, Any] = {"index": 0}
    if kind == "text":
        choice["text"] = content if isinstance(content, str) else ""
    elif whole:
        choice["message"] = {"role": "assistant", "content": content}
    else:
        choice["delta"] = (
            content if isinstance(content, dict) else ({"content": content} if content else {})
        )
    choice["logprobs"] = None
    choice["finish_reason"] = finish
    return choice


def completion_response(
    kind: str, request_id: str, served: ServedDeployment, result: GenerationResult
) -> dict[str, Any]:
    """The whole answer of a chat (``kind="chat"``) or text completion request."""
    return {
        "id": request_id,
        "object": OBJECTS[kind][0],
        "created": int(time.time()),
        "model": served.id,
        "choices": [_choice(kind, result.text, result.finish_reason, whole=True)],
        "usage": usage(result, served),
    }


def stream_chunk(
    kind: str,
    request_id: str,
    created: int,
    model: str,
    content: str | dict[str, str] | None,
    finish_reason: str | None = None,
    result: GenerationResult | None = None,
    served: ServedDeployment | None = None,
) -> dict[str, Any]:
    """A streamed piece: a text delta, the finish, or (with ``result``) the usage chunk."""
    body: dict[str, Any] = {
        "id": request_id,
        "object": OBJECTS[kind][1],
        "created": created,
        "model": model,
    }
    if result is not None and served is not None:
        body["choices"] = []
        body["usage"] = usage(result, served)
    else:
        body["choices"] = [_choice(kind, content, finish_reason, whole=False)]
    return body
