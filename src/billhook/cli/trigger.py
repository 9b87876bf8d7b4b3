"""`billhook trigger`: send a realistic, signed Stripe event to billhook (like `stripe trigger`)."""

from __future__ import annotations

import time

import httpx
import typer

from billhook.cli.app import app, console, err_console, settings
from billhook.errors import ConfigError
from billhook.secrets import announcement, ensure_secrets
from billhook.sources import stripe
from billhook.sources.templates import SUPPORTED_TYPES, build_event, render


@app.command()
def trigger(
    event_type: str = typer.Argument(..., help=f"One of: {', '.join(SUPPORTED_TYPES)}."),
    invoice: str = typer.Option(None, "--invoice", help="Invoice id (default: a new invoice)."),
    url: str = typer.Option(
        None, "--url", help="Endpoint (default http://BILLHOOK_HOST:BILLHOOK_PORT/webhooks/stripe)."
    ),
) -> None:
    """Build a Stripe event of EVENT_TYPE, sign it with the configured secret, post it."""
    config, generated = ensure_secrets(settings())
    if generated:
        err_console.print(announcement(generated))
    secret = config.stripe_secrets[0] if config.stripe_secrets else None
    if secret is None:
        raise ConfigError("no Stripe webhook secret: set BILLHOOK_STRIPE_WEBHOOK_SECRETS")
    now = int(time.time())
    event = build_event(event_type, invoice_id=invoice, now=now)
    body = render(event)
    target = url or f"http://{config.host}:{config.port}/webhooks/stripe"
    headers = {
        "Content-Type": "application/json; charset=utf-8",
        "Stripe-Signature": stripe.sign(body, secret, now),
        "User-Agent": "billhook-trigger",
    }
    try:
        response = httpx.post(target, content=body, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        err_console.print(f"[bold red]could not reach {target}:[/] {exc} (is `billhook serve` up?)")
        raise typer.Exit(3) from exc
    obj = event["data"]["object"]
    console.print(
        f"{event_type} {event['id']} (object {obj.get('id')}, "
        f"ordering key {stripe.ordering_key(event)}) -> {target}"
    )
    console.print(f"{response.status_code} {response.text}")
    if response.status_code >= 300:
        raise typer.Exit(1)
