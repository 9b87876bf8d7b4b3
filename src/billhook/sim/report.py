"""The simulation report for people (a Rich table) and for machines (`--json`)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from billhook.sim.checker import Report

_SHOWN_VIOLATIONS = 20


def render_report(report: Report, console: Console) -> None:
    table = Table(title="billhook simulate: invariant report", show_lines=False)
    table.add_column("check")
    table.add_column("value", justify="right")
    table.add_column("verdict")

    def row(name: str, value: object, bad: bool | None = None) -> None:
        verdict = "" if bad is None else ("[red]VIOLATION[/]" if bad else "[green]ok[/]")
        table.add_row(name, "n/a" if value is None else str(value), verdict)

    row("invoices simulated", report.invoices)
    row("distinct events", report.events)
    row("deliveries sent (with retries)", report.deliveries_sent)
    row("2xx received", report.acknowledged)
    other = {k: v for k, v in sorted(report.statuses.items()) if not k.startswith("2")}
    row("non-2xx / timeouts", ", ".join(f"{k}: {v}" for k, v in other.items()) or "0")
    row("events stored", report.events_stored)
    row(
        "2xx but not stored",
        report.acked_not_stored,
        None if report.acked_not_stored is None else report.acked_not_stored > 0,
    )
    row("events never acknowledged", report.never_acknowledged, report.never_acknowledged > 0)
    row("wrong final states", report.wrong_states, report.wrong_states > 0)
    row("missing effects", report.missing_effects, report.missing_effects > 0)
    row(
        "effects duplicated under different keys",
        report.duplicate_effects,
        report.duplicate_effects > 0,
    )
    row("unexpected effects", report.unexpected_effects, report.unexpected_effects > 0)
    row("resends under the same key (allowed)", report.resends)
    row("emails received by the sink", report.emails)
    row("worker processes killed", report.crashes)
    row("dead letters", len(report.dead_letters))
    row(
        "time to converge (s)",
        None if report.converge_seconds is None else f"{report.converge_seconds:.2f}",
        report.converge_seconds is None,
    )
    console.print(table)
    for dead in report.dead_letters[:_SHOWN_VIOLATIONS]:
        console.print(f"[yellow]dead letter[/] {dead.kind} {dead.subject}: {dead.reason}")
    for violation in report.violations[:_SHOWN_VIOLATIONS]:
        console.print(f"[red]{violation.invariant}[/] {violation.subject}: {violation.detail}")
    if len(report.violations) > _SHOWN_VIOLATIONS:
        console.print(f"... and {len(report.violations) - _SHOWN_VIOLATIONS} more (see --json)")
    for note in report.notes:
        console.print(f"[dim]{note}[/]")
    verdict = "[bold green]PASS[/]" if report.ok else "[bold red]FAIL[/]"
    console.print(f"{verdict}: {len(report.violations)} violation(s)")
