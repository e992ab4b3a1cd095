"""`specserve serve --ray` as a user runs it: Ray stays out of plain serving, a missing Ray or
an unreachable cluster is a one-line error, and a real run leaves no Ray process behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.paths import REPO_ROOT
from tests.server_harness import free_port

ROOT = REPO_ROOT
BLOCK_RAY = """
import sys
class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named {name!r}")
sys.meta_path.insert(0, NoRay())
from specserve.cli import main
sys.exit(main(sys.argv[1:]))
"""


# `serve --ray` stopped just before it starts Ray: what Serve, imported by then, defaults to.
STOP_BEFORE_RAY_STARTS = """
import sys
import specserve.server.ray_run as ray_run
def connect(address, loopback):
    from ray.serve._private.handle_options import DynamicHandleOptions
    print("by reference:", DynamicHandleOptions()._by_reference)
    sys.exit(0)
ray_run.connect = connect
from specserve.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "SPECSERVE_HOME": str(home), "PYTHONPATH": str(ROOT)}


def _specserve(home: Path, *args: str, code: str | None = None) -> subprocess.CompletedProcess[str]:
    head = ["-c", code] if code else ["-m", "specserve"]
    return subprocess.run(
        [sys.executable, *head, *args], env=_env(home), capture_output=True, text=True, timeout=120
    )


def test_plain_serving_does_not_import_ray() -> None:
    code = (
        "import sys, specserve.cli, specserve.server.run, specserve.server.app, "
        "specserve.server.served, specserve.deployments.cli; print('ray' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr


def test_missing_ray_says_how_to_install(tmp_path: Path) -> None:
    done = _specserve(tmp_path, "serve", "--ray", code=BLOCK_RAY)
    assert done.returncode == 2, done.stderr
    assert "--ray needs Ray Serve, which is not installed" in done.stderr
    assert 'pip install "specserve[ray]"' in done.stderr and "Traceback" not in done.stderr


def test_unreachable_address_and_address_without_ray(tmp_path: Path, tiny_gguf: Path) -> None:
    assert _specserve(tmp_path, "deployment", "create", str(tiny_gguf), "--id", "t").returncode == 0
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    done = _specserve(tmp_path, "serve", "--ray", "--address", address)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"cannot reach a Ray cluster at --address {address}" in done.stderr
    done = _specserve(tmp_path, "serve", "--address", address)
    assert done.returncode == 2 and "--address needs --ray" in done.stderr
    done = _specserve(tmp_path, "serve", "--stream-interval-ms", "5")
    assert done.returncode == 2 and "--stream-interval-ms needs --ray" in done.stderr
    done = _specserve(tmp_path, "serve", "--ray", "--stream-interval-ms", "-1")
    assert done.returncode == 2 and "--stream-interval-ms must be >= 0" in done.stderr
    with socket.socket() as taken:  # a port someone listens on: refused before Ray starts
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _specserve(tmp_path, "serve", "--ray", "--port", str(port))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"cannot serve on 127.0.0.1:{port}: Address already in use" in done.stderr


def test_haproxy_is_refused_where_it_cannot_serve(tmp_path: Path, tiny_gguf: Path) -> None:
    for name in ("a", "b"):
        done = _specserve(tmp_path, "deployment", "create", str(tiny_gguf), "--id", name)
        assert done.returncode == 0, done.stderr
    done = _specserve(tmp_path, "serve", "--ray-proxy", "haproxy")
    assert done.returncode == 2 and "--ray-proxy needs --ray" in done.stderr
    done = _specserve(tmp_path, "serve", "--ray", "--ray-proxy", "haproxy")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "fronts one deployment, not 2: pick one with --deployment ID" in done.stderr
    address = f"127.0.0.1:{free_port()}"
    done = _specserve(tmp_path, "serve", "--ray", "--ray-proxy", "haproxy", "--address", address)
    assert done.returncode == 2 and "on a cluster of your own (--address)" in done.stderr


def test_serve_ray_sets_the_fast_path_before_serve_is_imported(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    """Serve reads its settings once, at import: `serve --ray` imports it early (to fail fast
    without Ray), so the fast path must be set by then, or the handles built in this process
    would relay over Ray's object transfers instead of gRPC."""
    assert _specserve(tmp_path, "deployment", "create", str(tiny_gguf), "--id", "t").returncode == 0
    done = _specserve(
        tmp_path, "serve", "--ray", "--port", str(free_port()), code=STOP_BEFORE_RAY_STARTS
    )
    assert done.returncode == 0 and "by reference: False" in done.stdout, done.stderr


def _raylets() -> int:
    found = subprocess.run(["pgrep", "-c", "raylet"], capture_output=True, text=True)
    return int(found.stdout.strip() or 0)


@pytest.mark.ray
def test_serve_ray_command_serves_and_cleans_up(tmp_path: Path, tiny_gguf: Path) -> None:
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'specserve[ray]'")
    before, haproxy_dirs = _raylets(), set(Path("/tmp").glob("ssrv-hap-*"))
    created = _specserve(tmp_path, "deployment", "create", str(tiny_gguf), "--id", "tiny")
    assert created.returncode == 0, created.stderr
    port = free_port()
    command = [sys.executable, "-m", "specserve", "serve", "--ray", "--port", str(port)]
    command += ["--dtype", "float32", "--api-key", "k", "--max-context", "256"]
    server = subprocess.Popen(command, env=_env(tmp_path), stderr=subprocess.PIPE, text=True)
    said: list[str] = []  # its stderr, read as it comes
    assert server.stderr is not None
    stream = server.stderr
    reader = threading.Thread(target=lambda: said.extend(iter(stream.readline, "")))
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not any(line.startswith("specserve: serving") for line in said):
            assert server.poll() is None, "".join(said)
            assert time.monotonic() < deadline, "serve --ray did not come up"
            time.sleep(0.5)
        # What a user waits for; behind HAProxy it says which replicas answer.
        assert any("(HAProxy in front of the replicas)" in line for line in said), said
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        reply = client.completions.create(model="tiny", prompt="the", max_tokens=5, temperature=0)
        assert reply.usage is not None and reply.usage.completion_tokens == 5
        anonymous = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10)
        assert anonymous.status_code == 401
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
        reader.join(timeout=10)
    stderr = "".join(said)
    assert server.returncode == 0, stderr
    assert "stopping the Ray Serve applications" in stderr
    assert set(Path("/tmp").glob("ssrv-hap-*")) <= haproxy_dirs
    if before == 0:  # the local Ray instance it started is gone with it
        time.sleep(2)
        assert _raylets() == 0
