"""`billhook replay (--event ID... | --invoice ID | --since T ...) [--dry-run] [--rebuild] ...`.

Counts first, then either prints the diff it would cause (`--dry-run`: exit 3 if something
would change, 0 if not) or asks, replays with a progress bar, and prints what it did.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any, TypeVar

import orjson
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from sqlalchemy.engine import Engine

from billhook.cli.app import app, console, err_console, open_engine, print_json, settings
from billhook.config import Settings
from billhook.ops import audit
from billhook.ops.replay import (
    ReplayPlan,
    ReplayRequest,
    ReplayResult,
    Selection,
    execute_replay,
    parse_time,
    plan_replay,
    preview_replay,
)

T = TypeVar("T")

# Below this many events a progress bar only flickers.
PROGRESS_FROM = 200


class ResendKind(StrEnum):
    payment_receipt = "payment_receipt"
    refund_notice = "refund_notice"
    payment_failed_notice = "payment_failed_notice"


@app.command()
def replay(
    event_ids: list[str] = typer.Option(None, "--event", help="A stored event's provider id."),
    invoice_id: str = typer.Option(None, "--invoice", help="Every event about this invoice."),
    since: str = typer.Option(None, "--since", help="Received at or after T (ISO 8601/epoch)."),
    until: str = typer.Option(None, "--until", help="With --since: received before T."),
    event_type: str = typer.Option(None, "--type", help="With --since: only this event type."),
    source: str = typer.Option(None, "--source", help="Only events from stripe or standard."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the diff; change nothing."),
    rebuild: bool = typer.Option(
        False, "--rebuild", help="With --invoice: recompute it from all its stored events."
    ),
    resend: ResendKind = typer.Option(
        None, "--resend-effects", help="Send this kind of already-sent effect again (same key)."
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Re-run stored events through the normal pipeline; never re-sends an effect unless told."""
    request = ReplayRequest(
        Selection(
            event_ids=tuple(event_ids or ()),
            invoice_id=invoice_id,
            since=None if since is None else parse_time(since),
            until=None if until is None else parse_time(until),
            type=event_type,
            source=source,
        ),
        dry_run=dry_run,
        rebuild=rebuild,
        resend_effects=None if resend is None else resend.value,
    )
    request.check()
    config = settings()
    engine = open_engine(config)
    out = err_console if as_json else console
    try:
        plan = plan_replay(engine, request.selection)
        out.print(_counted(plan))
        if dry_run or rebuild:
            preview = ReplayResult.of_preview(
                preview_replay(
                    engine,
                    request.selection,
                    rebuild=rebuild,
                    resend_effects=request.resend_effects,
                )
            )
            if dry_run:
                _show(preview, as_json)
                raise typer.Exit(preview.exit_code)
            _show_diffs(preview)
            if not preview.changed:
                out.print("nothing to rebuild: the invoice already is what its events say")
                raise typer.Exit(0)
        if not yes and not typer.confirm("Replay now?", err=True):
            raise typer.Exit(1)
        result = _execute(engine, request, config, total=plan.events)
    except KeyboardInterrupt:
        err_console.print(
            "interrupted: the events replayed so far are committed; "
            "run the same command again to finish (replaying is idempotent)"
        )
        raise typer.Exit(130) from None
    finally:
        engine.dispose()
    _show(result, as_json)
    raise typer.Exit(result.exit_code)


def _execute(
    engine: Engine, request: ReplayRequest, config: Settings, *, total: int
) -> ReplayResult:
    actor = audit.cli_actor()

    def perform(action: str, params: Mapping[str, Any], operation: Callable[[], T]) -> T:
        return audit.perform(engine, actor=actor, action=action, params=params, operation=operation)

    with Progress(
        TextColumn("replaying"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        disable=total < PROGRESS_FROM,
    ) as progress:
        task = progress.add_task("replay", total=total)
        return execute_replay(
            engine,
            request,
            settings=config,
            perform=perform,
            on_event=lambda: progress.advance(task),
        )


def _counted(plan: ReplayPlan) -> str:
    text = f"selected {plan.events} event(s) about {len(plan.invoice_ids)} invoice(s)"
    if plan.unresolved:
        text += f"; {plan.unresolved} about a charge or nothing billhook can tie to an invoice"
    return text


def _show(result: ReplayResult, as_json: bool) -> None:
    if as_json:
        print_json(result.to_dict())
        return
    _show_diffs(result)
    for failure in result.failed:
        console.print(f"[yellow]event {failure.event_id} ({failure.source}):[/] {failure.error}")
    if result.dry_run:
        verdict = "would change something" if result.changed else "nothing would change"
        console.print(
            f"dry run: {verdict} ({len(result.diffs)} invoice(s) would change, "
            f"{result.unchanged} unchanged, {result.ignored} event(s) ignored, "
            f"{len(result.failed)} failing); nothing was written"
        )
        return
    console.print(
        f"replayed: {result.applied} applied, {result.ignored} ignored, "
        f"{len(result.failed)} failed"
        + (f"; rebuilt {len(result.diffs)} invoice(s)" if result.rebuilt else "")
        + (f"; resending {len(result.resent)}: {', '.join(result.resent)}" if result.resent else "")
    )


def _show_diffs(result: ReplayResult) -> None:
    for diff in result.diffs:
        what = "" if diff.known else " (new)"
        console.print(f"[bold]invoice {diff.invoice_id}[/]{what} from {diff.events} event(s)")
        for change in diff.changes:
            console.print(
                f"  {change.field}: {_value(change.before)} → {_value(change.after)}",
                markup=False,
                highlight=False,
            )
        for effect in diff.new_effects:
            console.print(f"  + effect {effect.kind} ({effect.idempotency_key})", markup=False)
        for key in diff.resend:
            console.print(f"  ↻ resend {key} (same key)", markup=False)


def _value(value: Any) -> str:
    return orjson.dumps(value).decode() if not isinstance(value, str) else value
