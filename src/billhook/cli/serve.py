"""`billhook serve`: the HTTP API alone (webhooks, health, metrics)."""

from __future__ import annotations

import typer

from billhook.api.server import serve as run_server
from billhook.cli.app import app, settings


@app.command()
def serve(
    host: str = typer.Option(None, help="Listen address (default BILLHOOK_HOST)."),
    port: int = typer.Option(None, help="Listen port (default BILLHOOK_PORT)."),
    processes: int = typer.Option(
        None,
        min=1,
        help="HTTP server processes sharing the port (default BILLHOOK_SERVER_PROCESSES, 1).",
    ),
) -> None:
    """Serve the HTTP API. Stays up while the database is down, answering 503 until it is back."""
    config = settings()
    overrides = {
        k: v
        for k, v in {"host": host, "port": port, "server_processes": processes}.items()
        if v is not None
    }
    run_server(config.model_copy(update=overrides) if overrides else config)
