"""Every admin route by every kind of caller, over real HTTP, on SQLite and PostgreSQL.

A refused call (no token, unknown, revoked, or a viewer trying to act) answers 401/403 with a
`detail` that says what to do, and changes nothing: every table, the audit log included, has the
same content checksum before and after. An operator's action is audited under the token's name.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from billhook.api.app import create_app
from billhook.config import load_settings
from billhook.ops.tokens import create_token, revoke_token
from billhook.sources import IncomingEvent
from billhook.store.engine import transaction
from billhook.store.events import Arrival, record
from billhook.store.schema import audit_log, effects, invoices, jobs, metadata
from live_server import running_app

INVOICE = "in_admin_1"
EVENT = "evt_admin_1"


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    role: str  # the least role that may call it
    action: str = ""  # the audit action an operator call records (default: the path's tail)

    @property
    def acts(self) -> bool:
        return self.role == "operator"


ROUTES = [
    Route("GET", "/api/v1/status", "viewer"),
    Route("GET", "/api/v1/invoices", "viewer"),
    Route("GET", f"/api/v1/invoices/{INVOICE}", "viewer"),
    Route("GET", "/api/v1/events", "viewer"),
    Route("GET", f"/api/v1/events/{EVENT}", "viewer"),
    Route("GET", "/api/v1/jobs", "viewer"),
    Route("GET", "/api/v1/jobs/{job}", "viewer"),
    Route("GET", "/api/v1/dead-letters", "viewer"),
    Route("GET", "/api/v1/audit", "viewer"),
    Route("POST", "/api/v1/dead-letters/{job}/redrive", "operator"),
    Route("GET", "/api/v1/dead-effects", "viewer"),
    Route("POST", "/api/v1/dead-effects/{effect}/redrive", "operator", "redrive_effect"),
    Route("POST", "/api/v1/pause", "operator"),
    Route("POST", "/api/v1/resume", "operator"),
]

# caller -> expected status for a read route / for an operator route
EXPECTED = {
    "none": (401, 401),
    "basic": (401, 401),
    "unknown": (401, 401),
    "revoked": (401, 401),
    "viewer": (200, 403),
    "operator": (200, 200),
}


@dataclass(frozen=True)
class Admin:
    base_url: str
    engine: Engine
    headers: dict[str, dict[str, str]]
    job_id: int
    effect_id: int


@pytest.fixture
def admin(engine: Engine, tmp_path: Path) -> Iterator[Admin]:
    job_id, effect_id = _seed(engine)
    tokens = {
        role: create_token(engine, name=f"{role}-token", role=role, actor="cli:test")
        for role in ("viewer", "operator")
    }
    revoked = create_token(engine, name="former", role="operator", actor="cli:test")
    revoke_token(engine, name="former", actor="cli:test")
    headers = {
        "none": {},
        "basic": {"Authorization": "Basic b3BlcmF0b3I6c2VjcmV0"},
        "unknown": {"Authorization": "Bearer bh_not-a-real-token"},
        "revoked": {"Authorization": f"Bearer {revoked}"},
        "viewer": {"Authorization": f"Bearer {tokens['viewer']}"},
        "operator": {"Authorization": f"Bearer {tokens['operator']}"},
    }
    settings = load_settings(database_url=str(engine.url), data_dir=str(tmp_path))
    with running_app(create_app(settings, engine)) as base_url:
        yield Admin(base_url, engine, headers, job_id, effect_id)


def test_every_caller_gets_its_status_and_a_refusal_changes_nothing(admin: Admin) -> None:
    # One server and one database for the whole table: refusals must leave it as it was, and
    # the operator calls run in ROUTES order (redrive while the job is dead, then pause, resume).
    with httpx.Client(timeout=10) as client:
        for route in ROUTES:
            _check_route(client, admin, route)


def _check_route(client: httpx.Client, admin: Admin, route: Route) -> None:
    url = admin.base_url + route.path.format(job=admin.job_id, effect=admin.effect_id)
    for caller in ("none", "basic", "unknown", "revoked", "viewer"):
        where = f"{route.method} {route.path} as {caller}"
        before = _checksums(admin.engine)
        response = client.request(route.method, url, headers=admin.headers[caller])
        expected = EXPECTED[caller][route.acts]
        assert response.status_code == expected, (where, response.text)
        assert _checksums(admin.engine) == before, f"{where} changed the store"
        if expected == 401:
            assert response.headers["www-authenticate"].startswith("Bearer"), where
            assert "billhook token create" in response.json()["detail"], where
        if expected == 403:
            assert "--role operator" in response.json()["detail"], where

    before = _checksums(admin.engine)
    response = client.request(route.method, url, headers=admin.headers["operator"])
    assert response.status_code == 200, (route, response.text)
    after = _checksums(admin.engine)
    if not route.acts:
        assert after == before, f"{route.method} {route.path} (a read) changed the store"
        return
    with admin.engine.connect() as connection:
        newest = (
            connection.execute(sa.select(audit_log).order_by(audit_log.c.id.desc()).limit(1))
            .mappings()
            .one()
        )
    assert (newest["actor"], newest["outcome"]) == ("operator-token", "ok")
    assert newest["action"] == (route.action or route.path.rsplit("/", 1)[-1])


def test_reads_return_the_stored_state(admin: Admin) -> None:
    auth = admin.headers["viewer"]
    with httpx.Client(base_url=admin.base_url, headers=auth, timeout=10) as client:
        invoice = client.get(f"/api/v1/invoices/{INVOICE}").json()
        assert {k: invoice[k] for k in ("status", "currency", "amount_due", "amount_paid")} == {
            "status": "paid",
            "currency": "eur",
            "amount_due": 1200,
            "amount_paid": 1200,
        }
        assert invoice["customer_email"] == "Ada@Example.com" and invoice["disputed"] is False
        assert client.get("/api/v1/invoices/in_nope").status_code == 404
        assert client.get("/api/v1/invoices", params={"email": "ada@example.COM"}).json()["items"][
            0
        ]["id"] == (INVOICE)
        assert client.get("/api/v1/invoices", params={"status": "open"}).json()["items"] == []
        bad = client.get("/api/v1/invoices", params={"status": "bogus"})
        assert bad.status_code == 422 and "'paid'" in bad.text  # the schema's enum, named

        event = client.get(f"/api/v1/events/{EVENT}").json()
        assert orjson.loads(event["body"])["id"] == EVENT and event["body_is_utf8"]
        assert event["headers"]["stripe-signature"] == "t=1,v1=abc"
        assert [d["outcome"] for d in event["deliveries"]] == ["accepted", "duplicate"]
        assert client.get(f"/api/v1/events/{event['id']}").json()["event_id"] == EVENT
        events = client.get("/api/v1/events", params={"type": "invoice.paid"}).json()
        assert [e["event_id"] for e in events["items"]] == [EVENT]

        dead = client.get("/api/v1/jobs", params={"state": "dead"}).json()["items"]
        assert [j["id"] for j in dead] == [admin.job_id]
        letters = client.get("/api/v1/dead-letters").json()["items"]
        assert [(d["job_id"], d["last_error"]) for d in letters] == [(admin.job_id, "boom")]


def test_lists_page_with_a_cursor_and_refuse_a_forged_one(admin: Admin) -> None:
    now = time.time()
    with transaction(admin.engine) as connection:
        for n in range(5):
            connection.execute(
                invoices.insert().values(
                    id=f"in_page_{n}", source="stripe", state="{}", created_at=now, updated_at=now
                )
            )
    seen: list[str] = []
    cursor: str | None = None
    with httpx.Client(base_url=admin.base_url, headers=admin.headers["viewer"]) as client:
        while True:
            params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = client.get("/api/v1/invoices", params=params).json()
            seen += [item["id"] for item in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert len(seen) == 6 and len(set(seen)) == 6
        forged = client.get("/api/v1/invoices", params={"cursor": "WzEsMl0"})
        assert forged.status_code == 400 and "next_cursor" in forged.json()["detail"]


def _seed(engine: Engine) -> tuple[int, int]:
    """One paid invoice, one event delivered twice whose job died, one dead email."""
    now = time.time()
    body = orjson.dumps({"id": EVENT, "type": "invoice.paid", "data": {"object": {}}})
    event = IncomingEvent(
        source="stripe",
        event_id=EVENT,
        type="invoice.paid",
        ordering_key=INVOICE,
        occurred_at=now - 10,
        headers={"stripe-signature": "t=1,v1=abc"},
        body=body,
    )
    with transaction(engine) as connection:
        for received_at in (now - 5, now - 4):
            record(connection, Arrival(event, received_at), now=now, max_attempts=3)
        connection.execute(
            jobs.update().values(state="dead", attempts=3, finished_at=now, last_error="boom")
        )
        connection.execute(
            invoices.insert().values(
                id=INVOICE,
                source="stripe",
                number="ADA-0001",
                status="paid",
                currency="eur",
                amount_due=1200,
                amount_paid=1200,
                customer_email="Ada@Example.com",
                state="{}",
                created_at=now - 10,
                updated_at=now - 1,
            )
        )
        effect_id = connection.execute(
            effects.insert()
            .values(
                idempotency_key=f"payment_receipt:{INVOICE}",
                kind="payment_receipt",
                channel="email",
                invoice_id=INVOICE,
                payload="{}",
                state="dead",
                attempts=3,
                max_attempts=3,
                run_at=now,
                created_at=now,
                last_error="SMTP refused",
            )
            .returning(effects.c.id)
        ).scalar_one()
        return int(connection.execute(sa.select(jobs.c.id)).scalar_one()), int(effect_id)


def _checksums(engine: Engine) -> dict[str, str]:
    """A content hash per table: any insert, update or delete changes one."""
    sums: dict[str, str] = {}
    with engine.connect() as connection:
        for table in metadata.sorted_tables:
            order = list(table.primary_key.columns)
            rows = connection.execute(sa.select(table).order_by(*order)).all()
            digest = hashlib.sha256(repr([tuple(row) for row in rows]).encode()).hexdigest()
            sums[table.name] = digest
    return sums
