"""The opt-in traffic log (``serve --record-traffic``): each request's prompt, never its output,
as one JSON line in the prompt-file format `specserve tune --prompts` reads.

Each line goes to the file in one ``write`` on a descriptor opened for appending, so several
processes may log to one file (the replicas of ``serve --ray`` on one machine) and their
lines never interleave."""

from __future__ import annotations

import json
import os
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

    def record(self, deployment: str, body: CommonRequest) -> None:
        row: dict[str, Any] = {"time": round(time.time(), 3), "deployment": deployment}
        if isinstance(body, ChatCompletionRequest):
            row["messages"] = body.chat_messages()
        elif isinstance(body, CompletionRequest):
            prompt = body.prompt_input()
            row["prompt" if isinstance(prompt, str) else "prompt_token_ids"] = prompt
        if body.prediction is not None:
            row["prediction"] = join_text(body.prediction.content)
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)
        finally:
            os.close(fd)
        if written != len(line):  # a full disk: say so rather than leave half a line unnoticed
            raise OSError(f"{self.path}: wrote {written} of {len(line)} bytes of a traffic line")
