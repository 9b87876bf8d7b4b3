"""`billhook pause` / `billhook resume`: stop and restart processing; ingest keeps storing."""

from __future__ import annotations

import time

from billhook.cli.app import app, console, open_engine, settings
from billhook.ops.audit import cli_actor, perform
from billhook.ops.pause import set_paused
from billhook.ops.status import read_status


@app.command()
def pause() -> None:
    """Workers stop claiming (running jobs finish). Stored: survives restarts."""
    _switch(True)


@app.command()
def resume() -> None:
    """Workers claim again and drain the backlog."""
    _switch(False)


def _switch(paused: bool) -> None:
    engine = open_engine(settings())
    try:
        perform(
            engine,
            actor=cli_actor(),
            action="pause" if paused else "resume",
            params={},
            operation=lambda: set_paused(engine, paused, now=time.time()),
        )
        current = read_status(engine, now=time.time())
    finally:
        engine.dispose()
    console.print(
        f"paused: {str(current.paused).lower()} "
        f"(jobs pending: {current.jobs_pending}, running: {current.jobs_running}, "
        f"oldest pending: {current.oldest_pending_age_s:.1f} s)"
    )
