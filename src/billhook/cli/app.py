"""The Typer application every command module registers on, and what commands share."""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import orjson
import typer
from rich.console import Console
from sqlalchemy.engine import Engine

from billhook.config import Settings, load_settings
from billhook.errors import BillhookError
from billhook.observability import configure_logging
from billhook.store.engine import create_engine

app = typer.Typer(
    name="billhook",
    help="Billing webhooks received durably, processed once, explained always.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Billing webhooks received durably, processed once, explained always."""
    # Logs go to stderr from the first line, so `--json` output on stdout stays machine-readable.
    # A configuration error is reported by the command itself, with its exit code.
    with contextlib.suppress(BillhookError):
        configure_logging(load_settings())


def settings() -> Settings:
    return load_settings()


def open_engine(config: Settings | None = None) -> Engine:
    return create_engine((config or settings()).database_url)


def print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def main() -> None:
    """Console-script entry: domain errors become one readable line and a stable exit code."""
    try:
        app()
    except BillhookError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        raise SystemExit(exc.exit_code) from None
