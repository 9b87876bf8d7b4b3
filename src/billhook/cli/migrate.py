"""`billhook migrate`: apply schema migrations, or print their SQL for review."""

from __future__ import annotations

import typer

from billhook.cli.app import app, console, open_engine, settings
from billhook.store.migrate import current_revision, head_revision, upgrade, upgrade_sql


@app.command()
def migrate(
    sql: bool = typer.Option(False, "--sql", help="Print the SQL instead of running it."),
) -> None:
    """Apply schema migrations to BILLHOOK_DATABASE_URL (safe to run again)."""
    config = settings()
    if sql:
        typer.echo(upgrade_sql(config.database_url))
        return
    engine = open_engine(config)
    before = current_revision(engine)
    upgrade(engine)
    console.print(f"database at revision {head_revision()} (was {before or 'empty'})")
