"""`billhook status`: what is waiting, running, dead, and whether processing is paused."""

from __future__ import annotations

import time

import typer
from rich.table import Table

from billhook.cli.app import app, console, open_engine, print_json, settings
from billhook.ops.status import read_status


@app.command()
def status(
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON."),
) -> None:
    """Queue depth and age, dead letters, effect backlog, paused or not."""
    engine = open_engine(settings())
    try:
        current = read_status(engine, now=time.time())
    finally:
        engine.dispose()
    if as_json:
        print_json(current.as_dict())
        return
    table = Table(show_header=False, box=None)
    for key, value in current.as_dict().items():
        table.add_row(key, str(value).lower() if isinstance(value, bool) else str(value))
    console.print(table)
