"""Run the HTTP app under uvicorn: `serve` for `billhook serve`, `build_server` to embed it.

With `server_processes` > 1 (`billhook serve --processes N`, `BILLHOOK_SERVER_PROCESSES`), the
parent binds the listening socket once and N spawned children accept on it, each with its own app,
engine and group-commit writer: Python runs one request at a time per process, so on a machine
with more cores than one more processes answer more deliveries. The parent only supervises: a
child that dies takes the others down with it (the service manager restarts the whole), and
SIGTERM/SIGINT are passed on so every child drains before exit.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.util
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
from types import FrameType

import uvicorn
from starlette.applications import Starlette

from billhook.api.app import create_app, with_secrets
from billhook.config import Settings
from billhook.observability import configure_logging, get_logger

log = get_logger(__name__)
_PR_SET_PDEATHSIG = 1  # Linux prctl: signal this process when its parent dies


def build_server(settings: Settings, app: Starlette | None = None) -> uvicorn.Server:
    """A uvicorn server for `app` (default: `create_app(settings)`); `await server.serve()`."""
    config = uvicorn.Config(
        app if app is not None else create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        lifespan="on",
        access_log=False,  # one structured line per delivery is logged by the routes
        log_level=settings.log_level,
        server_header=False,
        backlog=4096,
    )
    return uvicorn.Server(config)


def serve(settings: Settings, app: Starlette | None = None) -> None:
    """Serve until SIGINT/SIGTERM. Starts and stays up while the database is down."""
    configure_logging(settings)
    if app is None and settings.server_processes > 1:
        sys.exit(_serve_processes(settings))
    _settle_heap()
    build_server(settings, app).run()


# The ingest writer thread gives up the GIL at every database call (fsync, network round trip)
# and must take it back from the event loop thread, which keeps it for up to the switch interval
# (5 ms by default): several such waits per group commit were the cost of a commit. 0.5 ms keeps
# them short without making the loop thread switch much more often.
SWITCH_INTERVAL_S = 0.0005


def _settle_heap() -> None:
    """Once, after imports and app creation, before serving."""
    # Start-up objects (modules, routes, settings) never die: keep the collector off them, and
    # collect young objects less often, so a busy server spends less time in gc.
    gc.collect()
    gc.freeze()
    gc.set_threshold(7000, 10, 10)
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def _serve_processes(settings: Settings) -> int:
    settings = with_secrets(settings)  # once, here: children must not race to generate them
    sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    sock.listen(4096)
    sock.set_inheritable(True)
    context = multiprocessing.get_context("spawn")
    children = [
        context.Process(target=_child, args=(settings, sock), name=f"billhook-serve-{i}")
        for i in range(settings.server_processes)
    ]
    for child in children:
        child.start()
    sock.close()
    log.info("serving", processes=len(children), host=settings.host, port=settings.port)

    def _forward(signum: int, _frame: FrameType | None) -> None:
        for child in children:
            if child.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signum)

    previous = {s: signal.signal(s, _forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        multiprocessing.connection.wait([c.sentinel for c in children])
        # One child ended (drained after a signal, or died): end the others too.
        for child in children:
            if child.is_alive():
                child.terminate()
        for child in children:
            child.join()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    codes = [child.exitcode or 0 for child in children]
    return next((code for code in codes if code != 0), 0)


def _child(settings: Settings, sock: socket.socket) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    configure_logging(settings)
    server = build_server(settings)
    _settle_heap()
    server.run(sockets=[sock])
