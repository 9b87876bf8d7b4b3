"""`billhook token create / list / revoke`: admin API tokens (shown once, stored hashed)."""

from __future__ import annotations

import datetime as dt

import typer
from rich.table import Table
from sqlalchemy.engine import Engine

from billhook.cli.app import app, console, err_console, open_engine, print_json, settings
from billhook.observability import configure_logging
from billhook.ops.audit import cli_actor
from billhook.ops.tokens import create_token, list_tokens, revoke_token

token_app = typer.Typer(help="Admin API tokens: a viewer reads, an operator also acts.")
app.add_typer(token_app, name="token")


@token_app.command("create")
def create(
    role: str = typer.Option(..., "--role", help="viewer (reads) or operator (also acts)."),
    name: str = typer.Option(..., "--name", help="Who holds it; shown in the audit log."),
) -> None:
    """Mint a token and print it once: only its hash is stored, it cannot be shown again."""
    engine = _open()
    try:
        token = create_token(engine, name=name, role=role, actor=cli_actor())
    finally:
        engine.dispose()
    # The token alone on stdout, so `TOKEN=$(billhook token create ...)` works.
    typer.echo(token)
    err_console.print(
        f"token {name!r} ({role}) created; it is shown only now. "
        "Send it as 'Authorization: Bearer <token>'."
    )


@token_app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="JSON instead of a table.")) -> None:
    """Every token: name, role, created, revoked (never the token or its hash)."""
    engine = open_engine()  # reads only: nothing to log
    try:
        tokens = list_tokens(engine)
    finally:
        engine.dispose()
    if as_json:
        print_json(
            [
                {
                    "name": t.name,
                    "role": t.role,
                    "created_at": t.created_at,
                    "revoked_at": t.revoked_at,
                }
                for t in tokens
            ]
        )
        return
    table = Table("name", "role", "created", "revoked")
    for t in tokens:
        table.add_row(t.name, t.role, _when(t.created_at), _when(t.revoked_at) or "-")
    console.print(table)


@token_app.command("revoke")
def revoke(name: str = typer.Argument(..., help="The token's name (see `token list`).")) -> None:
    """Revoke a token: requests with it get 401 from now on. Its name stays taken."""
    engine = _open()
    try:
        info = revoke_token(engine, name=name, actor=cli_actor())
    finally:
        engine.dispose()
    console.print(f"token {info.name!r} revoked at {_when(info.revoked_at)}")


def _open() -> Engine:
    # Logs go to stderr, so stdout carries only the token (`TOKEN=$(billhook token create ...)`).
    config = settings()
    configure_logging(config)
    return open_engine(config)


def _when(at: float | None) -> str:
    if at is None:
        return ""
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
