"""`billhook dlq list | show JOB_ID | redrive JOB_ID... | redrive --all [--type T]`."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import typer
from rich.table import Table

from billhook.cli.app import app, console, open_engine, print_json, settings
from billhook.errors import InvalidRequest
from billhook.ops.audit import cli_actor, perform
from billhook.ops.dlq import list_dead, redrive, show_job

dlq = typer.Typer(help="Inspect and re-drive dead-lettered jobs.", no_args_is_help=True)
app.add_typer(dlq, name="dlq")


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


@dlq.command("list")
def list_command(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    event_type: str = typer.Option(None, "--type", help="Only events of this type."),
    limit: int = typer.Option(100, "--limit", help="At most this many (1-1000)."),
) -> None:
    """Dead jobs, oldest first: job, event, type, attempts, last error, when it died."""
    engine = open_engine(settings())
    try:
        dead = list_dead(engine, event_type=event_type, limit=limit)
    finally:
        engine.dispose()
    if as_json:
        print_json([entry.to_dict() for entry in dead])
        return
    table = Table("job_id", "event_id", "type", "attempts", "dead_at", "last_error")
    for entry in dead:
        table.add_row(
            str(entry.job_id),
            entry.event_id or "-",
            entry.type or entry.kind,
            str(entry.attempts),
            _when(entry.dead_at),
            (entry.last_error or "")[:120],
        )
    console.print(table if dead else "no dead jobs")


@dlq.command("show")
def show_command(
    job_id: int = typer.Argument(..., help="The job id (from `dlq list`)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """One job with every attempt and its error and traceback."""
    engine = open_engine(settings())
    try:
        detail = show_job(engine, job_id)
    finally:
        engine.dispose()
    if as_json:
        print_json(detail.to_dict())
        return
    console.print(
        f"job {detail.job_id} [bold]{detail.state}[/] kind={detail.kind} "
        f"event={detail.event_id or '-'} type={detail.type or '-'} key={detail.ordering_key} "
        f"attempts={detail.attempts}/{detail.max_attempts}"
    )
    console.print(f"last error: {detail.last_error or '-'}")
    for attempt in detail.history:
        console.print(
            f"  attempt {attempt.attempt} {attempt.outcome} at {_when(attempt.finished_at)} "
            f"on {attempt.worker_id or '-'}: {attempt.error_type or ''} "
            f"{attempt.error_message or ''}"
        )
        if attempt.traceback:
            console.print(attempt.traceback.rstrip(), markup=False, highlight=False)


@dlq.command("redrive")
def redrive_command(
    job_ids: list[int] = typer.Argument(None, help="Dead job ids to run again."),
    all_jobs: bool = typer.Option(False, "--all", help="Every dead job (with --type: of it)."),
    event_type: str = typer.Option(None, "--type", help="With --all: only this event type."),
) -> None:
    """Dead jobs back to available with a fresh attempt budget (recorded in the audit log)."""
    if bool(job_ids) == all_jobs:
        raise InvalidRequest("name dead job ids, or pass --all (optionally with --type T)")
    if event_type is not None and not all_jobs:
        raise InvalidRequest("--type goes with --all")
    config = settings()
    engine = open_engine(config)
    try:
        result = perform(
            engine,
            actor=cli_actor(),
            action="dlq.redrive",
            params={"job_ids": job_ids or "all", "type": event_type},
            operation=lambda: redrive(
                engine,
                now=time.time(),
                max_attempts=config.max_attempts,
                job_ids=job_ids or None,
                event_type=event_type,
            ),
        )
    finally:
        engine.dispose()
    console.print(f"redriven: {result.count} job(s) {result.job_ids}")
