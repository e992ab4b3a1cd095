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


def chat_response(request_id: str, served: ServedDeployment, result: GenerationResult) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": served.id,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "logprobs": None,
                "finish_reason": result.finish_reason,
            }
        ],
        "usage": usage(result, served),
    }


def text_response(request_id: str, served: ServedDeployment, result: GenerationResult) -> dict:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": served.id,
        "choices": [
            {
                "index": 0,
                "text": result.text,
                "logprobs": None,
                "finish_reason": result.finish_reason,
            }
        ],
        "usage": usage(result, served),
    }


def chat_chunk(
    request_id: str,
    created: int,
    model: str,
    content: str | dict[str, str] | None,
    finish_reason: str | None = None,
    result: GenerationResult | None = None,
    served: ServedDeployment | None = None,
) -> dict[str, Any]:
    """A ``chat.completion.chunk``: a text delta, the finish, or (with ``result``) the usage."""
    body: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
    }
    if result is not None and served is not None:
        body["choices"] = []
        body["usage"] = usage(result, served)
        return body
    delta = content if isinstance(content, dict) else ({"content": content} if content else {})
    body["choices"] = [
        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    ]
    return body


def text_chunk(
    request_id: str,
    created: int,
    model: str,
    content: str | dict[str, str] | None,
    finish_reason: str | None = None,
    result: GenerationResult | None = None,
    served: ServedDeployment | None = None,
) -> dict[str, Any]:
    """A streamed ``text_completion`` piece, the finish, or (with ``result``) the usage."""
    body: dict[str, Any] = {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
    }
    if result is not None and served is not None:
        body["choices"] = []
        body["usage"] = usage(result, served)
        return body
    text = content if isinstance(content, str) else ""
    body["choices"] = [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]
    return body
