"""`specserve serve` as a user runs it: a subprocess, deployments from the database."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from tests.server_harness import free_port


def _specserve(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "specserve", *args], env=env, capture_output=True, text=True
    )


def test_serve_command_serves_stored_deployments(tiny_gguf: Path, tmp_path: Path) -> None:
    env = {**os.environ, "SPECSERVE_HOME": str(tmp_path)}
    created = _specserve("deployment", "create", str(tiny_gguf), "--id", "tiny", env=env)
    assert created.returncode == 0, created.stderr
    port = free_port()
    command = [sys.executable, "-m", "specserve", "serve", "--port", str(port)]
    command += ["--dtype", "float32", "--api-key", "k", "--max-context", "256"]
    server = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.communicate()[1]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        reply = client.completions.create(model="tiny", prompt="the", max_tokens=5, temperature=0)
        assert reply.usage.completion_tokens == 5
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)
    # A clean shutdown on SIGTERM: uvicorn stops the app (our engines), then re-raises it.
    assert server.returncode in (0, -15), stderr
    assert "Application shutdown complete" in stderr and "Traceback" not in stderr


def test_serve_refuses_bad_settings(tmp_path: Path) -> None:
    env = {**os.environ, "SPECSERVE_HOME": str(tmp_path)}
    result = _specserve("serve", "--max-batch", "0", env=env)
    assert result.returncode == 2 and "--max-batch must be a positive integer" in result.stderr
    result = _specserve("serve", "--prefix-cache-mb", "-1", env=env)
    assert result.returncode == 2 and "--prefix-cache-mb must be at least 0" in result.stderr
    # checked before the compute thread starts (an error there had been a traceback)
    result = _specserve("serve", "--threads", "-2", env=env)
    assert result.returncode == 2 and "--threads must be a positive integer" in result.stderr
    result = _specserve("serve", "--deployment", "nope", "--db", str(tmp_path / "d.db"), env=env)
    assert result.returncode == 2 and "nope" in result.stderr
