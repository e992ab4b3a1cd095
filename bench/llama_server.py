"""llama.cpp's own server for the peer benchmarks (bench.fast_apply, bench.structured): started
on loopback from a build's bin directory, and its /completion endpoint called greedy on
token ids."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

LLAMA_PORT = 8089


def llama_server(
    binary: Path, model: Path, args: list[str], threads: int
) -> subprocess.Popen[bytes]:
    """llama-server from ``binary`` (a build's bin directory) serving the GGUF ``model`` on
    loopback, one slot; returns once its /health answers."""
    cmd = [
        str(binary / "llama-server"),
        "-m",
        str(model),
        "-t",
        str(threads),
        "-c",
        "4096",
        "--host",
        "127.0.0.1",
        "--port",
        str(LLAMA_PORT),
        "-np",
        "1",
        *args,
    ]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{LLAMA_PORT}/health", timeout=1):
                return server
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"llama-server exited: {' '.join(cmd)}") from None
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("llama-server did not start")


def llama_complete(
    ids: list[int], max_tokens: int, cache_prompt: bool = False, **extra: Any
) -> dict[str, Any]:
    """llama-server's /completion, greedy, on token ids; ``cache_prompt``: reuse the slot's
    common prefix with its last request; ``extra``: more body fields."""
    body = {
        "prompt": ids,
        "n_predict": max_tokens,
        "temperature": 0.0,
        "top_k": 1,
        "cache_prompt": cache_prompt,
        "samplers": ["top_k"],
        **extra,
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{LLAMA_PORT}/completion",
        json.dumps(body).encode(),
        {"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())
