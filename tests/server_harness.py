"""A real uvicorn server on a free port, in a thread, for end-to-end tests with `openai`."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import uvicorn

from specserve.server.app import ServerSettings, create_app
from specserve.server.served import ServedDeployments


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningServer:
    served: ServedDeployments
    server: uvicorn.Server
    thread: threading.Thread
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_server(served: ServedDeployments, settings: ServerSettings) -> RunningServer:
    port = free_port()
    config = uvicorn.Config(
        create_app(served, settings), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return RunningServer(served, server, thread, port)
