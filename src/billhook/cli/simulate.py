"""`billhook simulate`: a hostile fake provider against a receiver, then an invariant report."""

from __future__ import annotations

import asyncio
import os
import secrets as _secrets
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from billhook.cli.app import app, console, err_console, print_json, settings
from billhook.errors import ConfigError
from billhook.observability import configure_logging

if TYPE_CHECKING:
    from billhook.sim.checker import Report
    from billhook.sim.runner import Echo, SimulationConfig


@app.command()
def simulate(
    target: str | None = typer.Option(
        None, "--target", help="Base URL of a running receiver; omit to start billhook itself."
    ),
    invoices: int = typer.Option(50, "--invoices", min=1, help="Invoice histories to generate."),
    seed: int | None = typer.Option(None, "--seed", help="Same seed, same histories and faults."),
    duplicates: float = typer.Option(
        0.1, "--duplicates", min=0.0, max=0.95, help="Probability an event is delivered again."
    ),
    reorder: bool = typer.Option(False, "--reorder", help="Deliver events in random order."),
    concurrency: int = typer.Option(8, "--concurrency", min=1, help="Deliveries in flight."),
    burst: bool = typer.Option(False, "--burst", help="Deliver in bursts with quiet gaps."),
    crash_workers: bool = typer.Option(
        False, "--crash-workers", help="SIGKILL billhook worker processes at random moments."
    ),
    smtp_outage: bool = typer.Option(False, "--smtp-outage", help="The SMTP sink refuses a while."),
    store_outage: bool = typer.Option(
        False, "--store-outage", help="Make the database unavailable for a while."
    ),
    store_outage_seconds: float = typer.Option(
        8.0,
        "--store-outage-seconds",
        min=0.1,
        help="How long the store is unavailable (default: longer than the 5 s request timeout).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    smtp_port: int = typer.Option(
        0, "--smtp-port", help="Bind the SMTP sink here (where the target sends mail)."
    ),
    token: str | None = typer.Option(
        None, "--token", envvar="BILLHOOK_TOKEN", help="Admin API token (viewer is enough)."
    ),
    database_url: str | None = typer.Option(
        None,
        "--database-url",
        help="Self-hosted on this PostgreSQL database (default: temp SQLite).",
    ),
    converge_timeout: float = typer.Option(
        60.0, "--converge-timeout", help="Seconds to wait for the receiver to converge."
    ),
) -> None:
    """Deliver random valid billing histories like a bad day in production; check the invariants.

    Exit code 0 only when no invariant is violated.
    """
    # Imported here, not at the top: every billhook process loads the CLI, few simulate.
    from billhook.sim.delivery import DeliveryOptions
    from billhook.sim.report import render_report
    from billhook.sim.runner import SimulationConfig

    config = SimulationConfig(
        target=target,
        invoices=invoices,
        seed=seed if seed is not None else _secrets.randbelow(2**31),
        delivery=DeliveryOptions(
            duplicates=duplicates, reorder=reorder, burst=burst, concurrency=concurrency
        ),
        crash_workers=crash_workers,
        smtp_outage=smtp_outage,
        store_outage=store_outage,
        store_outage_seconds=store_outage_seconds,
        smtp_port=smtp_port,
        token=token,
        database_url=database_url,
        converge_timeout=converge_timeout,
        namespace=_secrets.token_hex(4),
    )

    configure_logging(settings())  # logs to stderr: stdout stays the report (--json)

    def echo(line: str) -> None:
        err_console.print(f"[dim]simulate:[/] {line}")

    report = asyncio.run(_run(config, echo))
    if as_json:
        print_json(report.to_json())
    else:
        render_report(report, console)
    raise typer.Exit(0 if report.ok else 1)


async def _run(config: SimulationConfig, echo: Echo) -> Report:
    from billhook.sim.runner import Backend, run_simulation
    from billhook.sim.sink import SmtpSink

    if config.target is None:
        return await _self_hosted(config, echo)
    if config.crash_workers or config.store_outage:
        raise ConfigError(
            "--crash-workers and --store-outage need the simulator's own billhook: omit --target"
        )
    backend = Backend(base_url=config.target, secret=_first_secret(), token=config.token)
    with SmtpSink(port=config.smtp_port) as sink:
        echo(f"SMTP sink listening at {sink.url}: point the target's BILLHOOK_SMTP_URL there")
        return await run_simulation(config, backend, sink, echo)


async def _self_hosted(config: SimulationConfig, echo: Echo) -> Report:
    from billhook.sim.runner import run_simulation
    from billhook.sim.selfhost import SelfHosted
    from billhook.sim.sink import SmtpSink

    with tempfile.TemporaryDirectory(prefix="billhook-sim-") as workdir, SmtpSink() as sink:
        echo(f"SMTP sink at {sink.url}; work directory {workdir}")
        billhook = SelfHosted(
            Path(workdir), sink, database_url=config.database_url, seed=config.seed, echo=echo
        )
        try:
            await asyncio.to_thread(billhook.start)
            backend = billhook.backend(
                crash_workers=config.crash_workers,
                store_outage=config.store_outage,
                outage_seconds=config.store_outage_seconds,
            )
            return await run_simulation(config, backend, sink, echo)
        finally:
            await asyncio.to_thread(billhook.stop)


def _first_secret() -> str:
    raw = os.environ.get("BILLHOOK_STRIPE_WEBHOOK_SECRETS", "")
    secrets = [part.strip() for part in raw.split(",") if part.strip()]
    if not secrets:
        raise ConfigError(
            "BILLHOOK_STRIPE_WEBHOOK_SECRETS is not set: the simulator signs with the target's "
            "Stripe endpoint secret (whsec_...)"
        )
    return secrets[0]
