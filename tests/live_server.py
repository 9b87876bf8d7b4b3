"""Real HTTP servers for tests: an ASGI app under uvicorn in a thread, or billhook in a process.

Both listen on 127.0.0.1 on a free port and are stopped (and waited for) on exit. Use them from a
test module:

    from live_server import running_app, running_process

    with running_app(create_app(settings)) as base_url: ...
    with running_process(["serve"], env={...}) as proc: proc.base_url, proc.output()
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

STARTUP_TIMEOUT_S = 60.0  # generous: a loaded CI machine imports slowly


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_app(app: Any, *, log_level: str = "warning") -> Iterator[str]:
    """Serve `app` with uvicorn (lifespan on) in a thread; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, lifespan="on", log_level=log_level, access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def running_process(
    args: Sequence[str],
    *,
    env: Mapping[str, str],
    log_path: Path,
    ready_path: str = "/healthz",
) -> Iterator[ServerProcess]:
    """Run `billhook <args>` with BILLHOOK_PORT set to a free port; wait until `ready_path` answers.

    Stopped with SIGTERM (then SIGKILL) on exit; tests that need a crash kill `proc.process`.
    """
    port = free_port()
    full_env = {**os.environ, **env, "BILLHOOK_HOST": "127.0.0.1", "BILLHOOK_PORT": str(port)}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "billhook", *args],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                code = process.returncode
                raise RuntimeError(f"billhook exited early ({code}):\n{server.output()}")
            try:
                httpx.get(server.base_url + ready_path, timeout=1.0)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"billhook did not answer:\n{server.output()}") from None
                time.sleep(0.05)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
