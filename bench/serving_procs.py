"""The server processes of the --ray benchmark (bench/serving_ray.py): waiting for one to be
ready, stopping it with every process it started, and Ctrl-C, SIGTERM and the time limit as
exceptions that never cut a stop short."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

READY_TIMEOUT_S = 300.0  # a server's start: Ray, Serve and the replicas' model loads
STOP_GRACE_S = 60.0  # SIGTERM -> `serve --ray` removes its applications and stops its Ray


class Interrupts:
    """Ctrl-C, SIGTERM and the --time-limit alarm as exceptions in the main thread, held back
    while a server is being stopped, so that stopping always runs to its end."""

    def __init__(self) -> None:
        self.holding = 0
        self.pending: BaseException | None = None

    def install(self, limit_s: int) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):
            signal.signal(signum, self._handle)
        signal.alarm(limit_s)

    def uninstall(self) -> None:
        signal.alarm(0)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):
            signal.signal(
                signum,
                signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL,
            )

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        error: BaseException
        if signum == signal.SIGALRM:
            error = TimeoutError("--time-limit reached; every server was stopped")
        else:
            error = KeyboardInterrupt(signal.Signals(signum).name)
        if self.holding:
            self.pending = self.pending or error
            return
        raise error

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.holding += 1
        try:
            yield
        finally:
            self.holding -= 1
        if not self.holding and self.pending is not None:
            error, self.pending = self.pending, None
            raise error


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def processes_of(group: int, marker: bytes) -> list[int]:
    """Live processes of the server's process group, or whose command line or environment
    names its private Ray directory (Ray's daemons and workers, wherever they were started):
    processes this benchmark started, and no other."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] == "Z":  # a zombie: already dead, its parent reaps it
                continue
            if (
                int(fields[2]) == group
                or marker in (entry / "cmdline").read_bytes()
                or marker in (entry / "environ").read_bytes()
            ):
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
            continue
    return found


def stop_server(server: subprocess.Popen[bytes], ray_dir: Path) -> dict[str, Any]:
    """Stop a server and everything it started. SIGTERM first (`serve --ray` then removes
    its applications and stops the Ray instance it started); then SIGKILL, each by its id, to
    whatever is left of its process group or names its Ray directory."""
    on_sigterm = False
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(STOP_GRACE_S)
            on_sigterm = True
        except subprocess.TimeoutExpired:
            pass
    killed: set[int] = set()
    marker = str(ray_dir).encode()
    for _ in range(5):  # a dying Ray may still start a worker; look again
        left = processes_of(server.pid, marker)
        if not left:
            break
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
        time.sleep(1)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(10)
    left = processes_of(server.pid, marker)
    return {
        "exit_code": server.returncode,
        "stopped_on_sigterm": on_sigterm,
        "processes_killed_after": len(killed),
        "processes_left": len(left),
    }


def wait_ready(
    server: subprocess.Popen[bytes], port: int, deployment: str, replicas: int, poll_s: float = 0.5
) -> None:
    """Until /health answers 200 (with --ray: and lists all the replicas as running), asked
    every ``poll_s`` seconds."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited during start-up (code {server.returncode})")
        with contextlib.suppress(httpx.TransportError, ValueError, KeyError):
            reply = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            if reply.status_code == 200 and (
                not replicas or reply.json()["running"].get(deployment) == replicas
            ):
                return
        time.sleep(poll_s)
    raise RuntimeError(f"the server was not ready within {READY_TIMEOUT_S:.0f} s")
