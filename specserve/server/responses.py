"""Response bodies in OpenAI's shapes: completions, streamed chunks, and usage.

``usage`` carries OpenAI's ``completion_tokens_details`` (accepted / rejected prediction
tokens) plus a ``speculation`` object of our own: which drafter ran and how well it did.
With n > 1 choices, ``prompt_tokens`` counts the prompt once, ``completion_tokens`` the
choices' tokens together, and ``speculation`` sums the choices' drafts and target steps.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from specserve.engine.result import GenerationResult
from specserve.server.choices import merge_results
from specserve.server.logprobs import chat_logprobs, completion_logprobs, kept_logprobs
from specserve.server.tool_parser import parse_tool_calls, tool_finish_reason

if TYPE_CHECKING:
    from specserve.server.prepare import Plan
    from specserve.server.served import ServedDeployment


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def usage(results: Sequence[GenerationResult], served: ServedDeployment) -> dict[str, Any]:
    result = merge_results(results)
    completion = len(result.token_ids)
    prediction = result.prediction
    stats = result.stats
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": result.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": result.cached_prompt_tokens},
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
            # Tokens a grammar forced: free drafts (also by_method["grammar"]).
            "forced_tokens": stats.forced_tokens,
            "by_method": {name: m.as_dict() for name, m in stats.by_method.items()},
            "time_to_first_token": round(result.time_to_first_token, 4),
            "decode_tokens_per_second": round(result.decode_tokens_per_second, 2),
        },
    }


OBJECTS = {
    "chat": ("chat.completion", "chat.completion.chunk"),
    "text": ("text_completion", "text_completion"),
}


def logprobs_of(kind: str, result: GenerationResult, plan: Plan) -> dict[str, Any] | None:
    """A choice's ``logprobs`` object in the endpoint's shape, or None when not asked for."""
    if plan.speller is None or result.logprobs is None:
        return None
    entries = kept_logprobs(result.logprobs, result.text, plan.speller)
    if kind == "chat":
        return chat_logprobs(entries, plan.speller)
    return completion_logprobs(entries, plan.speller)


def assistant_message(result: GenerationResult, plan: Plan) -> tuple[dict[str, Any], str]:
    """The chat message (content and tool calls) and its finish reason."""
    if plan.tools is None or not plan.parses_tool_calls:
        return {"role": "assistant", "content": result.text}, result.finish_reason
    parsed = parse_tool_calls(result.text, parallel=plan.tools.parallel)
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
    if parsed.tool_calls:
        message["tool_calls"] = parsed.tool_calls
    return message, tool_finish_reason(bool(parsed.tool_calls), result.finish_reason)


def whole_choice(kind: str, index: int, result: GenerationResult, plan: Plan) -> dict[str, Any]:
    """One choice of a whole (not streamed) answer."""
    choice: dict[str, Any] = {"index": index}
    finish = result.finish_reason
    if kind == "text":
        choice["text"] = result.text
    else:
        choice["message"], finish = assistant_message(result, plan)
    choice["logprobs"] = logprobs_of(kind, result, plan)
    choice["finish_reason"] = finish
    return choice


def completion_response(
    kind: str,
    request_id: str,
    served: ServedDeployment,
    results: Sequence[GenerationResult],
    plan: Plan,
) -> dict[str, Any]:
    """The whole answer of a chat (``kind="chat"``) or text completion request."""
    return {
        "id": request_id,
        "object": OBJECTS[kind][0],
        "created": int(time.time()),
        "model": served.id,
        "choices": [whole_choice(kind, i, r, plan) for i, r in enumerate(results)],
        "usage": usage(results, served),
    }


def delta_choice(
    kind: str,
    index: int,
    delta: dict[str, Any] | None = None,
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One choice of a streamed chunk: a chat ``delta`` (a completion's ``text``)."""
    choice: dict[str, Any] = {"index": index}
    if kind == "text":
        choice["text"] = (delta or {}).get("content") or ""
    else:
        choice["delta"] = delta or {}
    choice["logprobs"] = logprobs
    choice["finish_reason"] = finish_reason
    return choice


def stream_chunk(
    kind: str, request_id: str, created: int, model: str, choices: list[dict[str, Any]]
) -> dict[str, Any]:
    """A streamed piece: choices' deltas or finishes; with no choices, add ``usage``."""
    return {
        "id": request_id,
        "object": OBJECTS[kind][1],
        "created": created,
        "model": model,
        "choices": choices,
    }
