"""`billhook explain INVOICE_ID`: the invoice's timeline, as a table or JSON."""

from __future__ import annotations

from datetime import UTC, datetime

import typer
from rich.table import Table

from billhook.cli.app import app, console, open_engine, print_json
from billhook.ops.explain import explain_invoice


@app.command()
def explain(
    invoice_id: str = typer.Argument(..., help="The provider's invoice id, e.g. in_1Abc…"),
    as_json: bool = typer.Option(False, "--json", help="Print invoice and timeline as JSON."),
) -> None:
    """Every event received (duplicates included), each state change and why, each effect."""
    engine = open_engine()
    try:
        explanation = explain_invoice(engine, invoice_id)
    finally:
        engine.dispose()
    if as_json:
        print_json(explanation.as_dict())
        return
    invoice = explanation.invoice
    head = Table(show_header=False, box=None, title=f"invoice {invoice_id}")
    for key in (
        "status",
        "currency",
        "amount_due",
        "amount_paid",
        "amount_refunded",
        "customer_email",
        "disputed",
        "held_refunds",
        "attention",
    ):
        if key in invoice:
            head.add_row(key, str(invoice[key]))
    console.print(head)
    table = Table(title="timeline (UTC)", expand=True)
    table.add_column("when", no_wrap=True)
    table.add_column("what", no_wrap=True)
    table.add_column("story", ratio=1, overflow="fold")
    for entry in explanation.timeline:
        when = (
            datetime.fromtimestamp(entry.at, UTC).strftime("%m-%d %H:%M:%S.%f")[:-3]
            if entry.at
            else "now"
        )
        story = entry.summary
        if entry.kind == "delivery" and entry.event_id:
            story = f"{entry.event_id} {story}"
        table.add_row(when, entry.kind, story)
    console.print(table)
