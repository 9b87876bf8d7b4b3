"""The classic bad day, end to end: real HTTP, real `billhook run` (API + worker processes), a real
SMTP server, real Stripe signatures. The same invoice.paid arrives three times and the refund
arrives before the payment it refunds. billhook must end with one receipt, one refund notice,
status refunded, and an explain that tells that story. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import copy
import email
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import stripe

from billhook.store.engine import create_engine
from billhook.store.schema import effects, event_outcomes, events, events_with_outcomes, invoices
from live_server import running_process
from smtp_servers import running_smtp

SECRET = "whsec_bad_day_secret"
INVOICE = "in_badday0001"
CHARGE = "ch_badday0001"
REFUND = "re_badday0001"


class _Inbox:
    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.messages.append(email.message_from_bytes(envelope.content))
        return "250 OK"


@pytest.fixture
def inbox() -> Iterator[tuple[_Inbox, str]]:
    handler = _Inbox()
    with running_smtp(handler) as smtp_url:
        yield handler, smtp_url


def _event(fixtures_dir: Path, name: str, event_id: str, created: int, **obj: Any) -> bytes:
    payload = copy.deepcopy(json.loads((fixtures_dir / "stripe_events" / name).read_text()))
    payload["id"] = event_id
    payload["created"] = created
    payload["data"]["object"].update(obj)
    return json.dumps(payload).encode()


def _post(base_url: str, body: bytes) -> httpx.Response:
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), SECRET)
    return httpx.post(
        base_url + "/webhooks/stripe",
        content=body,
        headers={"Stripe-Signature": header, "Content-Type": "application/json"},
        timeout=10,
    )


def _wait(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_the_classic_bad_day(
    database_url: str, fixtures_dir: Path, tmp_path: Path, inbox: tuple[_Inbox, str]
) -> None:
    mailbox, smtp_url = inbox
    env = {
        "BILLHOOK_DATABASE_URL": database_url,
        "BILLHOOK_STRIPE_WEBHOOK_SECRETS": SECRET,
        "BILLHOOK_SMTP_URL": smtp_url,
        "BILLHOOK_DATA_DIR": str(tmp_path / "data"),
        "BILLHOOK_WORKERS": "2",
        "BILLHOOK_RETRY_BASE_SECONDS": "0.05",
        "BILLHOOK_RETRY_MAX_SECONDS": "0.5",
        "BILLHOOK_POLL_INTERVAL_SECONDS": "0.05",
        "BILLHOOK_LOG_LEVEL": "warning",
    }
    t0 = int(time.time()) - 60
    finalized = _event(
        fixtures_dir,
        "invoice.finalized--stripe-sync-engine.json",
        "evt_bd_final",
        t0,
        id=INVOICE,
        status="open",
        paid=False,
        amount_due=5000,
        amount_paid=0,
        currency="usd",
        customer_email="grace@example.com",
        charge=None,
        status_transitions={
            "finalized_at": t0,
            "paid_at": None,
            "voided_at": None,
            "marked_uncollectible_at": None,
        },
    )
    paid = _event(
        fixtures_dir,
        "invoice.paid--stripe-sync-engine.json",
        "evt_bd_paid",
        t0 + 10,
        id=INVOICE,
        status="paid",
        paid=True,
        amount_due=5000,
        amount_paid=5000,
        currency="usd",
        customer_email="grace@example.com",
        charge=CHARGE,
        status_transitions={
            "finalized_at": t0,
            "paid_at": t0 + 10,
            "voided_at": None,
            "marked_uncollectible_at": None,
        },
    )
    refunded = _event(
        fixtures_dir,
        "charge.refunded--stripe-sync-engine.json",
        "evt_bd_refund",
        t0 + 20,
        id=CHARGE,
        invoice=INVOICE,
        amount=5000,
        amount_refunded=5000,
        refunded=True,
        currency="usd",
        refunds={
            "object": "list",
            "data": [
                {
                    "id": REFUND,
                    "object": "refund",
                    "amount": 5000,
                    "charge": CHARGE,
                    "currency": "usd",
                    "status": "succeeded",
                }
            ],
        },
    )
    with running_process(["run"], env=env, log_path=tmp_path / "run.log") as proc:
        engine = create_engine(database_url)

        def refund_processed() -> bool:
            with engine.connect() as connection:
                return (
                    connection.execute(
                        sa.select(event_outcomes.c.outcome)
                        .select_from(events_with_outcomes)
                        .where(events.c.event_id == "evt_bd_refund")
                    ).scalar_one_or_none()
                    == "processed"
                )

        answers = [_post(proc.base_url, body) for body in (finalized, refunded)]
        # The refund is processed before its payment exists: the case where it must be held.
        # (Queued together, provider order would run the earlier payment first.)
        _wait(refund_processed, "the refund processed before the payment arrives")
        answers += [_post(proc.base_url, body) for body in (paid, paid, paid)]
        assert [a.status_code for a in answers] == [200] * 5, proc.output()
        assert [a.json()["status"] for a in answers] == [
            "accepted",
            "accepted",
            "accepted",
            "duplicate",
            "duplicate",
        ]

        def settled() -> bool:
            with engine.connect() as connection:
                status = connection.execute(
                    sa.select(invoices.c.status).where(invoices.c.id == INVOICE)
                ).scalar_one_or_none()
                unsent = connection.execute(
                    sa.select(sa.func.count()).select_from(effects).where(effects.c.state != "sent")
                ).scalar()
            return status == "refunded" and unsent == 0 and len(mailbox.messages) >= 2

        try:
            _wait(settled, "refunded invoice, two emails sent")
        finally:
            engine.dispose()
        scrape = httpx.get(proc.base_url + "/metrics", timeout=10).text
        assert 'billhook_effects_by_state{channel="email",state="sent"} 2.0' in scrape
        assert 'billhook_webhooks_received_total{outcome="duplicate",source="stripe"} 2.0' in scrape
        assert 'billhook_jobs{state="completed"} 3.0' in scrape
        out = subprocess.run(
            [sys.executable, "-m", "billhook", "explain", INVOICE, "--json"],
            env={**os.environ, **env},
            capture_output=True,
            check=True,
            timeout=60,
        )
        story = json.loads(out.stdout)
    assert len(mailbox.messages) == 2, [m["Subject"] for m in mailbox.messages]
    subjects = sorted(str(m["Subject"]) for m in mailbox.messages)
    assert all(INVOICE in s for s in subjects)
    assert len({m["Message-ID"] for m in mailbox.messages}) == 2
    assert all(m["To"] == "grace@example.com" for m in mailbox.messages)

    facts = story["invoice"]
    assert (facts["amount_paid"], facts["amount_refunded"], facts["currency"]) == (
        5000,
        5000,
        "usd",
    )
    timeline = story["timeline"]
    deliveries = [e for e in timeline if e["kind"] == "delivery"]
    paid_deliveries = [
        e["detail"]["delivery"] for e in deliveries if e["event_id"] == "evt_bd_paid"
    ]
    assert sorted(paid_deliveries) == ["accepted", "duplicate", "duplicate"]
    text = "\n".join(e["summary"] for e in timeline)
    assert f"refund {REFUND} of 5000 held: invoice not yet paid" in text
    assert "→ paid" in text or "→ refunded" in text
    sent = [e for e in timeline if e["kind"] == "effect" and e["detail"].get("outcome") == "sent"]
    assert len(sent) == 2
