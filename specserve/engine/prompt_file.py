"""Prompt files: JSONL rows of requests as the API takes them (chat messages or a completion
prompt, optionally with a prediction). `specserve tune` measures on them, `specserve drafter
train` trains on them, and the server's traffic log (``serve --record-traffic``) writes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specserve.model.loader import Model


class PromptFileError(ValueError):
    """A malformed prompts file; the message names the line."""


@dataclass(frozen=True)
class PromptRecord:
    """One request as the API takes it: chat messages or a completion prompt."""

    messages: list[dict[str, str]] | None
    prompt: str | None
    prediction: str | None = None
    prompt_token_ids: list[int] | None = None  # a completions request sent as token ids

    def token_ids(self, model: Model) -> list[int]:
        if self.prompt_token_ids is not None:
            return list(self.prompt_token_ids)
        if self.messages is not None:
            return model.tokenizer.encode_chat(self.messages)
        return model.tokenizer.encode(self.prompt or "")

    def as_row(self) -> dict[str, Any]:
        """The JSONL row ``parse_prompt`` reads back as this prompt."""
        row: dict[str, Any] = {}
        if self.messages is not None:
            row["messages"] = self.messages
        elif self.prompt_token_ids is not None:
            row["prompt_token_ids"] = self.prompt_token_ids
        else:
            row["prompt"] = self.prompt
        if self.prediction is not None:
            row["prediction"] = self.prediction
        return row


def _text(content: Any, where: str) -> str:
    """A string, or OpenAI text parts ``[{"type": "text", "text": ...}]``."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    raise PromptFileError(f"{where}: content must be a string or a list of text parts")


def parse_prompt(row: Any, where: str) -> PromptRecord:
    """One JSONL row -> a prompt; ``where`` (file:line) prefixes every error."""
    if not isinstance(row, dict):
        raise PromptFileError(f"{where}: expected a JSON object")
    prediction = row.get("prediction")
    if isinstance(prediction, dict):
        prediction = _text(prediction.get("content"), f"{where} (prediction)")
    elif prediction is not None and not isinstance(prediction, str):
        raise PromptFileError(f"{where}: 'prediction' must be a string or a content object")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise PromptFileError(f"{where}: 'messages' must be a non-empty list")
        parsed = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise PromptFileError(f"{where}: each message needs a 'role' and 'content'")
            parsed.append({"role": m["role"], "content": _text(m.get("content", ""), where)})
        return PromptRecord(parsed, None, prediction)
    if isinstance(row.get("prompt"), str) and row["prompt"]:
        return PromptRecord(None, row["prompt"], prediction)
    ids = row.get("prompt_token_ids")
    if isinstance(ids, list) and ids and all(isinstance(i, int) for i in ids):
        return PromptRecord(None, None, prediction, ids)
    raise PromptFileError(f"{where}: needs 'messages' (chat) or a non-empty 'prompt' string")


def load_prompts(path: Path, limit: int | None = None) -> list[PromptRecord]:
    """JSONL rows ``{"messages": [...]}`` or ``{"prompt": "..."}``, optionally with a
    ``prediction`` (a string or OpenAI's ``{"type": "content", "content": ...}``). The
    server's traffic log (``serve --record-traffic``) has this shape; other keys are ignored."""
    prompts = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PromptFileError(f"{where}: not valid JSON ({exc.msg})") from None
            prompts.append(parse_prompt(row, where))
            if limit is not None and len(prompts) >= limit:
                break
    if not prompts:
        raise PromptFileError(f"{path}: no prompts in the file")
    return prompts
