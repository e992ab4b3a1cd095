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
    # A cluster named by $RAY_ADDRESS (or recorded by a past `ray start`, here long gone) is
    # not ours to join: without --address, `serve --ray` starts its own.
    elsewhere = _env(tmp_path) | {"RAY_ADDRESS": f"127.0.0.1:{free_port()}"}
    server = subprocess.Popen(command, env=elsewhere, stderr=subprocess.PIPE, text=True)
    said, reader = _read_stderr(server)
    try:
        _until_serving(server, said)
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


CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")  # where `ray start` records its address


def _ray_head(port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`ray start --head` on loopback as a user starts a cluster of their own, in a process
    group of its own (killing the group stops the cluster), answering on ``port``."""
    ray = str(Path(sys.executable).with_name("ray"))
    command = [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1"]
    command += [f"--port={port}", "--num-cpus=2", "--include-dashboard=false"]
    head = subprocess.Popen(
        [*command, "--disable-usage-stats"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while True:
        assert head.poll() is None, "ray start --head exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return head
        except OSError:
            assert time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(0.5)


@pytest.mark.ray
def test_serve_ray_joins_a_token_cluster_of_your_own(tmp_path: Path, tiny_gguf: Path) -> None:
    """docs/ray.md's cluster recipe on one machine: a head started with token authentication
    and the fast path's variables; `serve --ray --address` without the token is a one-line
    error that says what to set, with it serves from the ingress on --port itself, and on
    SIGTERM removes its application and leaves the cluster running."""
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'specserve[ray]'")
    from specserve.server.ray_run import fast_path_env

    created = _specserve(tmp_path, "deployment", "create", str(tiny_gguf), "--id", "tiny")
    assert created.returncode == 0, created.stderr
    port, gcs = free_port(), free_port()
    plain = {k: v for k, v in _env(tmp_path).items() if not k.startswith("RAY_AUTH")}
    plain |= {"HOME": str(tmp_path)} | fast_path_env(port)  # no ~/.ray/auth_token of the user's
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "specserve-test-" + "0" * 32}
    recorded = CURRENT_CLUSTER.read_bytes() if CURRENT_CLUSTER.exists() else None
    head = _ray_head(gcs, plain | token)
    try:
        address = f"127.0.0.1:{gcs}"
        serve = [sys.executable, "-m", "specserve", "serve", "--ray", "--address", address]
        serve += ["--port", str(port), "--dtype", "float32", "--max-context", "256"]
        refused = subprocess.run(serve, env=plain, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        assert "run with RAY_AUTH_MODE=token and the cluster's token" in refused.stderr
        server = subprocess.Popen(serve, env=plain | token, stderr=subprocess.PIPE, text=True)
        said, reader = _read_stderr(server)
        try:
            _until_serving(server, said)
            assert f"at http://127.0.0.1:{port}/v1" in "".join(said)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-")
            reply = client.completions.create(model="tiny", prompt="the", max_tokens=4)
            assert reply.usage is not None and reply.usage.completion_tokens == 4
            listener = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
            on_port = [line for line in listener.splitlines() if f"127.0.0.1:{port} " in line]
            assert on_port and "ServeRepli" in on_port[0], listener  # the ingress, not a proxy
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)
            reader.join(timeout=10)
        stderr = "".join(said)
        assert server.returncode == 0 and "stopping the Ray Serve applications" in stderr, stderr
        assert head.poll() is None and _raylets() >= 1  # the user's cluster still runs
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        # `ray start` recorded its address for later ray.init() calls: put back what was there
        if recorded is None:
            CURRENT_CLUSTER.unlink(missing_ok=True)
        else:
            CURRENT_CLUSTER.write_bytes(recorded)


def _read_stderr(server: subprocess.Popen[str]) -> tuple[list[str], threading.Thread]:
    """``server``'s stderr lines, read as they come by a thread (the pipe never fills)."""
    said: list[str] = []
    assert server.stderr is not None
    stream = server.stderr
    reader = threading.Thread(target=lambda: said.extend(iter(stream.readline, "")))
    reader.start()
    return said, reader


def _until_serving(server: subprocess.Popen[str], said: list[str]) -> None:
    """Wait (3 minutes at most) for the line that says ``server`` serves."""
    deadline = time.monotonic() + 180
    while not any(line.startswith("specserve: serving") for line in said):
        assert server.poll() is None, "".join(said)
        assert time.monotonic() < deadline, "serve --ray did not come up: " + "".join(said)
        time.sleep(0.5)
