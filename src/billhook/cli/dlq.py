"""`billhook dlq list | show JOB_ID | redrive [JOB_ID...] [--effect ID...] | redrive --all`.

Two things die: jobs (processing an event) and effects (an email or HTTP call that could not be
delivered). `list` shows both, with a kind column; `redrive` takes job ids, `--effect` ids, or
`--all`.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from datetime import UTC, datetime
from functools import partial

import typer
from rich.table import Table

from billhook.cli.app import app, console, open_engine, print_json, settings
from billhook.effects.deadletter import DeadEffect, list_dead_effects, redrive_effect
from billhook.errors import InvalidRequest
from billhook.ops.audit import cli_actor, perform
from billhook.ops.dlq import list_dead, redrive, show_job

dlq = typer.Typer(help="Inspect and re-drive dead jobs and dead effects.", no_args_is_help=True)
app.add_typer(dlq, name="dlq")


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def _effect_entry(effect: DeadEffect) -> dict[str, object]:
    """A dead effect in `dlq list --json`: kind "effect", its own kind under `effect_kind`."""
    entry: dict[str, object] = asdict(effect)
    entry["effect_kind"] = entry.pop("kind")
    return {"kind": "effect", **entry}


@dlq.command("list")
def list_command(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    event_type: str = typer.Option(None, "--type", help="Only events of this type."),
    limit: int = typer.Option(100, "--limit", help="At most this many (1-1000)."),
) -> None:
    """Dead jobs and dead effects, oldest first: kind, id, what, attempts, when, last error."""
    engine = open_engine(settings())
    try:
        dead = list_dead(engine, event_type=event_type, limit=limit)
        # Effects have no event type: a --type filter is about jobs only.
        dead_effects = [] if event_type else list_dead_effects(engine, limit=limit)
    finally:
        engine.dispose()
    if as_json:
        print_json(
            [entry.to_dict() for entry in dead] + [_effect_entry(effect) for effect in dead_effects]
        )
        return
    table = Table("kind", "id", "about", "attempts", "dead_at", "last_error")
    for entry in dead:
        table.add_row(
            entry.kind,
            str(entry.job_id),
            f"{entry.type or '-'} {entry.event_id or ''}",
            str(entry.attempts),
            _when(entry.dead_at),
            (entry.last_error or "")[:120],
        )
    for effect in dead_effects:
        table.add_row(
            "effect",
            str(effect.id),
            f"{effect.channel} {effect.idempotency_key}",
            str(effect.attempts),
            _when(effect.dead_at),
            (effect.last_error or "")[:120],
        )
    console.print(table if dead or dead_effects else "no dead jobs, no dead effects")


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
    effect_ids: list[int] = typer.Option(None, "--effect", help="A dead effect id to send again."),
    all_jobs: bool = typer.Option(
        False, "--all", help="Every dead job and dead effect (with --type: jobs of that type)."
    ),
    event_type: str = typer.Option(None, "--type", help="With --all: only this event type."),
) -> None:
    """Dead jobs back to available, dead effects back to pending, each with a fresh attempt
    budget (recorded in the audit log). A redriven effect keeps its idempotency key."""
    if bool(job_ids or effect_ids) == all_jobs:
        raise InvalidRequest(
            "name dead job ids and/or --effect ids, or pass --all (optionally with --type T)"
        )
    if event_type is not None and not all_jobs:
        raise InvalidRequest("--type goes with --all")
    config = settings()
    engine = open_engine(config)
    try:
        if job_ids or all_jobs:
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
            console.print(f"redriven: {result.count} job(s) {result.job_ids}")
        if all_jobs and event_type is None:
            effect_ids = [effect.id for effect in list_dead_effects(engine)]
        for effect_id in effect_ids or []:
            effect = perform(
                engine,
                actor=cli_actor(),
                action="dlq.redrive_effect",
                params={"effect_id": effect_id},
                operation=partial(redrive_effect, engine, effect_id, time.time()),
            )
            console.print(f"redriven: effect {effect.id} ({effect.idempotency_key})")
    finally:
        engine.dispose()
