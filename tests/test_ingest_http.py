"""Ingest over real HTTP: real payloads signed by the real SDKs, posted to uvicorn on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import standardwebhooks
import stripe as stripe_sdk

from billhook.api.app import create_app
from billhook.config import Settings
from billhook.store.engine import create_engine
from billhook.store.schema import deliveries, events, jobs
from live_server import running_app

STRIPE_SECRET = "whsec_ingest_test"
STANDARD_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def make_settings(database_url: str, tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": database_url,
        "data_dir": str(tmp_path / "data"),
        "stripe_webhook_secrets": f"whsec_retired,{STRIPE_SECRET}",
        "standard_webhook_secrets": STANDARD_SECRET,
        **overrides,
    }
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def server(database_url: str, tmp_path: Path) -> Iterator[str]:
    with running_app(create_app(make_settings(database_url, tmp_path))) as base_url:
        yield base_url


def stripe_headers(body: bytes, timestamp: int | None = None) -> dict[str, str]:
    header = stripe_sdk.WebhookSignature.generate_signature_header(
        body.decode(), STRIPE_SECRET, timestamp=timestamp or int(time.time())
    )
    return {"Stripe-Signature": header, "Content-Type": "application/json"}


def standard_headers(body: bytes, msg_id: str, when: datetime | None = None) -> dict[str, str]:
    moment = when or datetime.now(tz=UTC)
    signature = standardwebhooks.Webhook(STANDARD_SECRET).sign(msg_id, moment, body.decode())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": signature,
        "Content-Type": "application/json",
    }


def counts(database_url: str) -> tuple[int, int, int]:
    engine = create_engine(database_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            return tuple(  # type: ignore[return-value]
                connection.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
                for t in (events, deliveries, jobs)
            )
    finally:
        engine.dispose()


def test_real_stripe_events_are_stored_once_each(
    server: str, database_url: str, fixtures_dir: Path
) -> None:
    files = sorted((fixtures_dir / "stripe_events").glob("*.json"))
    files = [f for f in files if not f.name.startswith("_")]
    seen: set[str] = set()
    with httpx.Client(base_url=server) as client:
        for path in files:
            body = path.read_bytes()
            event_id = json.loads(body).get("id")
            response = client.post("/webhooks/stripe", content=body, headers=stripe_headers(body))
            if not event_id:  # an old sample without an id is refused, never stored
                assert response.status_code == 400, path.name
                assert "'id'" in response.json()["detail"]
                continue
            expected = "duplicate" if event_id in seen else "accepted"
            assert response.status_code == 200, (path.name, response.text)
            assert response.json() == {"status": expected, "event_id": event_id}, path.name
            seen.add(event_id)
    # The shared fixtures reuse event ids across types: dedupe is on (source, id), as Stripe's is.
    stored, delivered, enqueued = counts(database_url)
    assert stored == len(seen) == enqueued
    assert delivered == len([f for f in files if json.loads(f.read_bytes()).get("id")])


def test_stored_event_keeps_raw_bytes_and_headers_without_signature(
    server: str, database_url: str, fixtures_dir: Path
) -> None:
    path = fixtures_dir / "stripe_events" / "charge.refunded--stripe-sync-engine.json"
    body = path.read_bytes()
    headers = stripe_headers(body)
    response = httpx.post(server + "/webhooks/stripe", content=body, headers=headers)
    assert response.status_code == 200
    engine = create_engine(database_url, poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        row = connection.execute(sa.select(events)).one()
    engine.dispose()
    assert bytes(row.body) == body
    assert row.ordering_key == "in_1KJdKkJDPojXS6LNSwSWkZSN"
    assert row.occurred_at == 1619701111.0
    stored_headers = json.loads(row.headers)
    assert "stripe-signature" not in stored_headers
    assert stored_headers["stripe-signature-timestamp"] == headers["Stripe-Signature"][2:12]


def canonical(event_id: str, invoice_id: str = "in_std_1") -> bytes:
    return json.dumps(
        {
            "id": event_id,
            "type": "invoice.paid",
            "occurred_at": "2024-05-01T12:00:00Z",
            "data": {
                "invoice_id": invoice_id,
                "number": "BH-0001",
                "status": "paid",
                "currency": "eur",
                "amount_due": 1200,
                "amount_paid": 1200,
                "customer_email": "ada@example.com",
            },
        }
    ).encode()


def test_standard_webhooks_delivery_and_redelivery(server: str, database_url: str) -> None:
    body = canonical("evt_std_1")
    with httpx.Client(base_url=server) as client:
        first = client.post(
            "/webhooks/standard", content=body, headers=standard_headers(body, "msg_1")
        )
        # A retry of the same message: same webhook-id, fresh timestamp and signature.
        again = client.post(
            "/webhooks/standard", content=body, headers=standard_headers(body, "msg_1")
        )
    assert first.status_code == 200 and first.json() == {"status": "accepted", "event_id": "msg_1"}
    assert again.status_code == 200 and again.json()["status"] == "duplicate"
    engine = create_engine(database_url, poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        row = connection.execute(sa.select(events)).one()
        job = connection.execute(sa.select(jobs)).one()
    engine.dispose()
    assert (row.source, row.event_id, row.ordering_key) == ("standard", "msg_1", "in_std_1")
    assert counts(database_url) == (1, 2, 1)
    assert row.occurred_at == job.order_ts == datetime(2024, 5, 1, 12, tzinfo=UTC).timestamp()


def test_fifty_concurrent_deliveries_of_one_event(server: str, database_url: str) -> None:
    stripe_body = json.dumps(
        {
            "id": "evt_burst",
            "type": "invoice.paid",
            "created": 1700000000,
            "data": {"object": {"id": "in_burst", "object": "invoice"}},
        }
    ).encode()

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=server, limits=limits, timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        "/webhooks/stripe", content=stripe_body, headers=stripe_headers(stripe_body)
                    )
                    for _ in range(50)
                )
            )

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    statuses = [r.json()["status"] for r in responses]
    assert statuses.count("accepted") == 1 and statuses.count("duplicate") == 49
    assert counts(database_url) == (1, 50, 1)


def test_on_enqueued_hook_fires_after_commit(sqlite_url: str, tmp_path: Path) -> None:
    calls: list[tuple[int, int, int]] = []
    app = create_app(
        make_settings(sqlite_url, tmp_path),
        on_enqueued=lambda: calls.append(counts(sqlite_url)),
    )
    body = json.dumps({"id": "evt_hook", "type": "invoice.created"}).encode()
    with running_app(app) as base_url:
        for _ in range(2):
            response = httpx.post(
                base_url + "/webhooks/stripe", content=body, headers=stripe_headers(body)
            )
            assert response.status_code == 200
    assert calls == [(1, 1, 1)]  # once, for the accepted one, and the job was already committed
