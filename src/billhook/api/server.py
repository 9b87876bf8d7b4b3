"""Run the HTTP app under uvicorn: `serve` for `billhook serve`, `build_server` to embed it."""

from __future__ import annotations

import importlib.util

import uvicorn
from starlette.applications import Starlette

from billhook.api.app import create_app
from billhook.config import Settings
from billhook.observability import configure_logging


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
    )
    return uvicorn.Server(config)


def serve(settings: Settings, app: Starlette | None = None) -> None:
    """Serve until SIGINT/SIGTERM. Starts and stays up while the database is down."""
    configure_logging(settings)
    build_server(settings, app).run()
