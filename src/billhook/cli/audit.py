"""`billhook audit`: the operator-action trail, newest first."""

from __future__ import annotations

import datetime as dt

import orjson
import typer
from rich.table import Table

from billhook.cli.app import app, console, open_engine, print_json
from billhook.ops.audit import list_audit


@app.command()
def audit(
    as_json: bool = typer.Option(False, "--json", help="JSON instead of a table."),
    limit: int = typer.Option(100, "--limit", min=1, max=1000, help="How many entries."),
    actor: str | None = typer.Option(None, "--actor", help="Only this actor."),
    action: str | None = typer.Option(None, "--action", help="Only this action."),
) -> None:
    """Who did which operator action (pause, redrive, replay, token...), when, and how it ended."""
    engine = open_engine()
    try:
        entries = list_audit(engine, limit=limit, actor=actor, action=action)
    finally:
        engine.dispose()
    if as_json:
        print_json([entry.__dict__ for entry in entries])
        return
    table = Table("at", "actor", "action", "params", "outcome")
    for entry in entries:
        table.add_row(
            dt.datetime.fromtimestamp(entry.at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
            entry.actor,
            entry.action,
            orjson.dumps(entry.params).decode(),
            entry.outcome,
        )
    console.print(table)
