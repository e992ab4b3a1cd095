"""The opt-in traffic log (``serve --record-traffic``): each request's prompt, never its output,
as one JSON line in the prompt-file format `specserve tune --prompts` reads."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from specserve.server.schemas import (
    ChatCompletionRequest,
    CommonRequest,
    CompletionRequest,
    join_text,
)


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
