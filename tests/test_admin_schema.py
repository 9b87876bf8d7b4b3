"""The admin API against its own OpenAPI schema (schemathesis, operator token, real HTTP), and the
wall between the two kinds of auth: webhooks never take a token, admin routes never a signature.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, get_args

import httpx
import pytest
import schemathesis
import sqlalchemy as sa
import stripe as stripe_sdk
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    positive_data_acceptance,
)

from billhook.api.admin import EventOutcome, InvoiceStatus
from billhook.api.app import create_app
from billhook.config import load_settings
from billhook.ops.events import EVENT_OUTCOMES
from billhook.ops.tokens import create_token
from billhook.store.engine import create_engine
from billhook.store.schema import INVOICE_STATUSES, events
from billhook.store.schema import settings as settings_table
from live_server import running_app

STRIPE_SECRET = "whsec_admin_schema_test"
EXAMPLES = 10


@dataclass(frozen=True)
class Live:
    base_url: str
    token: str
    database_url: str


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A migrated SQLite database, an operator token and the whole app served on 127.0.0.1."""
    from billhook.store.migrate import upgrade

    folder = tmp_path_factory.mktemp("admin_schema")
    url = f"sqlite:///{folder / 'billhook.db'}"
    engine = create_engine(url)
    upgrade(engine)
    token = create_token(engine, name="schemathesis", role="operator", actor="cli:test")
    config = load_settings(
        database_url=url, data_dir=str(folder), stripe_webhook_secrets=STRIPE_SECRET
    )
    with running_app(create_app(config, engine)) as base_url:
        yield Live(base_url, token, url)
    engine.dispose()


def test_every_response_matches_the_schema(live: Live) -> None:
    # Driven by hand rather than by `schemathesis.pytest.from_fixture`, whose lazy loader does
    # not run on pytest 9: each operation, valid and invalid inputs, a few examples each.
    schema = schemathesis.openapi.from_url(f"{live.base_url}/api/v1/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _fuzz(operation, mode, live)
            except Exception as exc:
                raise AssertionError(f"{operation.label} ({mode.value}): {exc}") from exc


def _fuzz(operation: Any, mode: GenerationMode, live: Live) -> None:
    auth = {"Authorization": f"Bearer {live.token}"}
    excluded_always = []
    if mode is GenerationMode.NEGATIVE:
        # The operator token is added to every case, so a case made invalid by a missing
        # Authorization header is valid when sent; and unknown query parameters are ignored, as
        # HTTP APIs do. "No 5xx" and "every response matches the schema" still hold.
        excluded_always.append(negative_data_rejection)

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def _check(case: Any) -> None:
        excluded = list(excluded_always)
        if "cursor" in (case.query or {}):
            # A cursor is opaque: no schema can say which strings the API handed out, so a
            # made-up one is a 400 although it is a "valid" string.
            excluded.append(positive_data_acceptance)
        case.call_and_validate(
            base_url=f"{live.base_url}/api/v1", headers=auth, excluded_checks=excluded
        )

    _check()


def test_the_closed_sets_in_the_schema_are_the_stores() -> None:
    assert get_args(InvoiceStatus) == INVOICE_STATUSES
    assert get_args(EventOutcome) == EVENT_OUTCOMES


def test_openapi_and_docs_are_served_under_the_prefix(live: Live) -> None:
    base_url = live.base_url
    spec = httpx.get(f"{base_url}/api/v1/openapi.json").json()
    assert "/invoices/{invoice_id}" in spec["paths"] and spec["servers"] == [{"url": "/api/v1"}]
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    docs = httpx.get(f"{base_url}/api/v1/docs")
    assert docs.status_code == 200 and "/api/v1/openapi.json" in docs.text


def test_admin_routes_never_accept_a_webhook_signature(live: Live) -> None:
    base_url = live.base_url
    body = b'{"id": "evt_sig_only", "object": "event", "type": "invoice.paid"}'
    signature = stripe_sdk.WebhookSignature.generate_signature_header(
        body.decode(), STRIPE_SECRET, timestamp=int(time.time())
    )
    engine = create_engine(live.database_url)
    before = _paused_rows(engine)
    for path in ("/api/v1/pause", "/api/v1/dead-letters/1/redrive"):
        response = httpx.post(
            base_url + path,
            content=body,
            headers={"Stripe-Signature": signature, "Content-Type": "application/json"},
        )
        assert response.status_code == 401, response.text
        assert "Bearer" in response.json()["detail"]
    assert _paused_rows(engine) == before
    engine.dispose()


def test_webhook_routes_never_accept_a_token(live: Live) -> None:
    base_url, token = live.base_url, live.token
    body = b'{"id": "evt_token_only", "object": "event", "type": "invoice.paid"}'
    for path in ("/webhooks/stripe", "/webhooks/standard"):
        response = httpx.post(
            base_url + path,
            content=body,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        assert response.status_code == 400, response.text
        assert response.json()["detail"]
    engine = create_engine(live.database_url)
    with engine.connect() as connection:
        stored = connection.execute(sa.select(events.c.event_id)).scalars().all()
    engine.dispose()
    assert "evt_token_only" not in stored


def _paused_rows(engine: sa.Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as connection:
        return [tuple(r) for r in connection.execute(sa.select(settings_table))]
