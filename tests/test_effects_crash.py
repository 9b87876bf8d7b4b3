"""The crash window for real: a dispatcher process is SIGKILLed after handing a message to SMTP and
before recording it; the next dispatcher resends under the same Message-ID and counts it."""

from __future__ import annotations

import email
import os
import signal
import subprocess
import sys
import time
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from aiosmtpd.controller import Controller
from prometheus_client import REGISTRY

from billhook.config import Settings
from billhook.effects import EffectDispatcher, effect_timeline, enqueue_effects, list_dead_effects
from billhook.effects.render import message_id
from billhook.store.engine import create_engine, transaction
from billhook.store.schema import effects
from live_server import free_port

LEASE_SECONDS = 30.0

DISPATCHER_SCRIPT = """
import sys
from billhook.config import Settings
from billhook.effects import EffectDispatcher
from billhook.store.engine import create_engine
url, smtp_url, lease = sys.argv[1], sys.argv[2], float(sys.argv[3])
settings = Settings(database_url=url, smtp_url=smtp_url, lease_seconds=lease)
EffectDispatcher(create_engine(settings.database_url), settings).run_once()
print("recorded", flush=True)
"""


class Intent:
    kind = "payment_receipt"
    idempotency_key = "payment_receipt:in_crash"
    payload: dict[str, Any] = {
        "invoice_id": "in_crash",
        "number": "C-1",
        "currency": "usd",
        "customer_email": "jane@example.com",
        "amount": 4200,
    }


class KillOnFirstData:
    """Accepts every message; on the n-th, SIGKILLs the dispatcher before answering 250."""

    def __init__(self, kill_on: int = 1) -> None:
        self.messages: list[EmailMessage] = []
        self.victim: subprocess.Popen[bytes] | None = None
        self.kill_on = kill_on

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        parsed = email.message_from_bytes(envelope.content, policy=default_policy)
        assert isinstance(parsed, EmailMessage)
        self.messages.append(parsed)
        if len(self.messages) == self.kill_on:
            assert self.victim is not None
            os.kill(self.victim.pid, signal.SIGKILL)
            self.victim.wait(timeout=10)
        return "250 OK"


def kill_dispatcher_mid_send(
    database_url: str, settings: Settings, handler: KillOnFirstData
) -> subprocess.Popen[bytes]:
    """Run a dispatcher in its own process; the SMTP handler SIGKILLs it during DATA."""
    victim = subprocess.Popen(
        [
            sys.executable,
            "-c",
            DISPATCHER_SCRIPT,
            database_url,
            settings.smtp_url,
            str(LEASE_SECONDS),
        ],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    handler.victim = victim
    assert victim.wait(timeout=60) == -signal.SIGKILL
    return victim


def test_sigkill_between_hand_over_and_record_resends_under_the_same_message_id(
    database_url: str, tmp_path: Path
) -> None:
    engine = create_engine(database_url)
    handler = KillOnFirstData()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        settings = Settings(
            database_url=database_url,
            smtp_url=f"smtp://127.0.0.1:{port}",
            data_dir=str(tmp_path),
            lease_seconds=LEASE_SECONDS,
        )
        with transaction(engine) as connection:
            enqueue_effects(
                connection,
                [Intent()],
                invoice_id="in_crash",
                event_pk=None,
                now=time.time(),
                settings=settings,
            )

        victim = kill_dispatcher_mid_send(database_url, settings, handler)
        assert victim.stdout is not None and b"recorded" not in victim.stdout.read()
        victim.stdout.close()
        assert len(handler.messages) == 1

        with engine.connect() as connection:
            stuck = connection.execute(sa.select(effects)).mappings().one()
        assert stuck["state"] == "sending" and stuck["resends"] == 0

        # Within the lease, nobody touches it: the first dispatcher might still be alive.
        assert EffectDispatcher(engine, settings).run_once() == 0

        resent_before = (
            REGISTRY.get_sample_value(
                "billhook_effects_resent_total", {"channel": "email", "kind": "payment_receipt"}
            )
            or 0.0
        )
        later = EffectDispatcher(engine, settings, clock=lambda: time.time() + LEASE_SECONDS + 1)
        assert later.run_once() == 1
        later.close()
    finally:
        controller.stop()

    first, second = handler.messages
    expected_id = message_id(Intent.idempotency_key, Intent.kind)
    assert first["Message-ID"] == second["Message-ID"] == expected_id
    assert first["Date"] == second["Date"]
    with engine.connect() as connection:
        done = connection.execute(sa.select(effects)).mappings().one()
    assert done["state"] == "sent" and done["resends"] == 1 and done["sent_at"] is not None
    assert (
        REGISTRY.get_sample_value(
            "billhook_effects_resent_total", {"channel": "email", "kind": "payment_receipt"}
        )
        == resent_before + 1
    )

    (history,) = effect_timeline(engine, "in_crash")
    assert history.resends == 1 and history.state == "sent"
    interrupted, resent = history.history
    assert interrupted.outcome == "sending" and interrupted.finished_at is not None
    assert "delivery unknown" in (interrupted.error or "")
    assert resent.outcome == "resent" and resent.attempt == 2
    assert list_dead_effects(engine) == []
    engine.dispose()


def test_a_lease_lost_on_the_last_attempt_is_dead_not_looped(
    sqlite_url: str, tmp_path: Path
) -> None:
    """A dispatcher that keeps dying on one message stops after max_attempts, with a clear error."""
    engine = create_engine(sqlite_url)
    handler = KillOnFirstData()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        settings = Settings(
            database_url=sqlite_url,
            smtp_url=f"smtp://127.0.0.1:{port}",
            data_dir=str(tmp_path),
            max_attempts=1,
            lease_seconds=LEASE_SECONDS,
        )
        with transaction(engine) as connection:
            enqueue_effects(
                connection,
                [Intent()],
                invoice_id="in_crash",
                event_pk=None,
                now=time.time(),
                settings=settings,
            )
        victim = kill_dispatcher_mid_send(sqlite_url, settings, handler)
        assert victim.stdout is not None
        victim.stdout.close()
        later = EffectDispatcher(engine, settings, clock=lambda: time.time() + LEASE_SECONDS + 1)
        assert later.run_once() == 0
        later.close()
    finally:
        controller.stop()
    assert len(handler.messages) == 1
    (dead,) = list_dead_effects(engine)
    assert dead.idempotency_key == Intent.idempotency_key
    assert "may or may not have been delivered" in (dead.last_error or "")
    engine.dispose()


def receipt(invoice_id: str) -> Any:
    class Receipt(Intent):
        idempotency_key = f"payment_receipt:{invoice_id}"
        payload = {**Intent.payload, "invoice_id": invoice_id}

    return Receipt()


def test_only_the_message_in_doubt_is_resent_when_a_batch_is_cut_short(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Killed while handing over the 2nd of 3: the 1st is recorded, the 2nd is resent (counted),
    the 3rd was never handed over, so it is sent once and not counted as a resend."""
    engine = create_engine(sqlite_url)
    handler = KillOnFirstData(kill_on=2)
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        settings = Settings(
            database_url=sqlite_url,
            smtp_url=f"smtp://127.0.0.1:{port}",
            data_dir=str(tmp_path),
            lease_seconds=LEASE_SECONDS,
        )
        with transaction(engine) as connection:
            for invoice_id in ("in_a", "in_b", "in_c"):
                enqueue_effects(
                    connection,
                    [receipt(invoice_id)],
                    invoice_id=invoice_id,
                    event_pk=None,
                    now=time.time(),
                    settings=settings,
                )
        victim = kill_dispatcher_mid_send(sqlite_url, settings, handler)
        assert victim.stdout is not None
        victim.stdout.close()
        later = EffectDispatcher(engine, settings, clock=lambda: time.time() + LEASE_SECONDS + 1)
        assert later.run_once() == 2
        later.close()
    finally:
        controller.stop()
    received = [m["X-Billhook-Idempotency-Key"] for m in handler.messages]
    assert sorted(received) == sorted(
        [
            "payment_receipt:in_a",
            "payment_receipt:in_b",
            "payment_receipt:in_b",
            "payment_receipt:in_c",
        ]
    )
    with engine.connect() as connection:
        rows = dict(connection.execute(sa.select(effects.c.invoice_id, effects.c.resends)).all())
    assert rows == {"in_a": 0, "in_b": 1, "in_c": 0}
    outcomes = {
        invoice_id: [a.outcome for a in effect_timeline(engine, invoice_id)[0].history]
        for invoice_id in rows
    }
    assert outcomes == {"in_a": ["sent"], "in_b": ["sending", "resent"], "in_c": ["sent"]}
    engine.dispose()
