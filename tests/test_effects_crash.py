"""The crash window for real: a dispatcher process is SIGKILLed after handing a message to SMTP and
before recording it; the next dispatcher resends under the same Message-ID and counts it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY
from sqlalchemy.engine import Engine

from billhook.config import Settings
from billhook.effects import EffectDispatcher, effect_timeline, enqueue_effects, list_dead_effects
from billhook.effects.render import message_id
from billhook.store.engine import create_engine, transaction
from billhook.store.schema import effects
from smtp_servers import SmtpHandler, received_message, running_smtp, sent_behind

LEASE_SECONDS = 30.0

DISPATCHER_SCRIPT = """
import sys
from billhook.config import Settings
from billhook.effects import EffectDispatcher
from billhook.store.engine import create_engine
url, smtp_url, lease, batch = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
settings = Settings(database_url=url, smtp_url=smtp_url, lease_seconds=lease)
dispatcher = EffectDispatcher(create_engine(settings.database_url), settings, batch_size=batch)
while dispatcher.run_once():
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


def crash_settings(database_url: str, smtp_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(
        database_url=database_url,
        smtp_url=smtp_url,
        data_dir=str(tmp_path),
        lease_seconds=LEASE_SECONDS,
        **overrides,
    )


def enqueue(engine: Engine, settings: Settings, intents: dict[str, Any]) -> None:
    """Each intent's effect, for the invoice it is keyed by, in one transaction."""
    with transaction(engine) as connection:
        for invoice_id, intent in intents.items():
            enqueue_effects(
                connection,
                [intent],
                invoice_id=invoice_id,
                event_pk=None,
                now=time.time(),
                settings=settings,
            )


class KillOnFirstData(SmtpHandler):
    """Accepts every message; on the n-th, SIGKILLs the dispatcher before answering 250. Offers
    PIPELINING if asked, and notes what the client had already sent behind each content."""

    def __init__(self, kill_on: int = 1, *, pipelining: bool = False) -> None:
        super().__init__(pipelining=pipelining)
        self.messages: list[EmailMessage] = []
        self.behind: list[bytes] = []
        self.victim: subprocess.Popen[bytes] | None = None
        self.kill_on = kill_on

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(received_message(envelope))
        self.behind.append(sent_behind(server))
        if len(self.messages) == self.kill_on:
            assert self.victim is not None
            os.kill(self.victim.pid, signal.SIGKILL)
            self.victim.wait(timeout=10)
        return "250 OK"


def kill_dispatcher_mid_send(
    database_url: str, settings: Settings, handler: KillOnFirstData, batch_size: int = 200
) -> subprocess.Popen[bytes]:
    """Run a dispatcher (batch after batch) in its own process; the SMTP handler SIGKILLs it
    during DATA."""
    victim = subprocess.Popen(
        [
            sys.executable,
            "-c",
            DISPATCHER_SCRIPT,
            database_url,
            settings.smtp_url,
            str(LEASE_SECONDS),
            str(batch_size),
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
    with running_smtp(handler) as smtp_url:
        settings = crash_settings(database_url, smtp_url, tmp_path)
        enqueue(engine, settings, {"in_crash": Intent()})

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
    with running_smtp(handler) as smtp_url:
        settings = crash_settings(sqlite_url, smtp_url, tmp_path, max_attempts=1)
        enqueue(engine, settings, {"in_crash": Intent()})
        victim = kill_dispatcher_mid_send(sqlite_url, settings, handler)
        assert victim.stdout is not None
        victim.stdout.close()
        later = EffectDispatcher(engine, settings, clock=lambda: time.time() + LEASE_SECONDS + 1)
        assert later.run_once() == 0
        later.close()
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


def _three_receipts_and_a_kill(
    sqlite_url: str, tmp_path: Path, *, kill_on: int, batch_size: int, pipelining: bool
) -> tuple[Engine, list[str], list[bytes]]:
    """Three receipts; the dispatcher is SIGKILLed during the `kill_on`-th DATA, then another
    dispatcher runs once the lease is over. Returns the keys in the order the server got them,
    and what the client had sent behind each content."""
    engine = create_engine(sqlite_url)
    handler = KillOnFirstData(kill_on=kill_on, pipelining=pipelining)
    with running_smtp(handler) as smtp_url:
        settings = crash_settings(sqlite_url, smtp_url, tmp_path)
        enqueue(engine, settings, {i: receipt(i) for i in ("in_a", "in_b", "in_c")})
        victim = kill_dispatcher_mid_send(sqlite_url, settings, handler, batch_size)
        assert victim.stdout is not None
        victim.stdout.close()
        later = EffectDispatcher(engine, settings, clock=lambda: time.time() + LEASE_SECONDS + 1)
        while later.run_once():
            pass
        later.close()
    keys = [str(m["X-Billhook-Idempotency-Key"]) for m in handler.messages]
    return engine, keys, handler.behind


def _resends_and_outcomes(engine: Engine) -> tuple[dict[str, int], dict[str, list[str]]]:
    with engine.connect() as connection:
        rows = dict(connection.execute(sa.select(effects.c.invoice_id, effects.c.resends)).all())
    outcomes = {
        invoice_id: [a.outcome for a in effect_timeline(engine, invoice_id)[0].history]
        for invoice_id in rows
    }
    return rows, outcomes


@pytest.mark.parametrize("pipelining", [False, True], ids=["one_at_a_time", "pipelining"])
def test_every_unrecorded_message_of_a_cut_batch_is_resent_under_its_key(
    sqlite_url: str, tmp_path: Path, pipelining: bool
) -> None:
    """Killed while handing over the 2nd of a batch of 3: no outcome of the batch was recorded
    (they are committed together at its end), so all three are in doubt. The 1st and 2nd reach
    the server twice, the 3rd (never handed over before the kill) once; each is counted as a
    resend, and every copy carries its own key. Pipelined, the 3rd's envelope had gone behind
    the 2nd's content: its content had not, and it still reaches the server once."""
    engine, received, behind = _three_receipts_and_a_kill(
        sqlite_url, tmp_path, kill_on=2, batch_size=3, pipelining=pipelining
    )
    if pipelining:
        assert behind[1].startswith(b"MAIL FROM:") and behind[1].endswith(b"DATA\r\n")
    else:
        assert set(behind) == {b""}
    assert received == [
        "payment_receipt:in_a",
        "payment_receipt:in_b",
        "payment_receipt:in_a",
        "payment_receipt:in_b",
        "payment_receipt:in_c",
    ]
    rows, outcomes = _resends_and_outcomes(engine)
    assert rows == {"in_a": 1, "in_b": 1, "in_c": 1}
    assert outcomes == {
        "in_a": ["sending", "resent"],
        "in_b": ["sending", "resent"],
        "in_c": ["sending", "resent"],
    }
    assert list_dead_effects(engine) == []
    engine.dispose()


@pytest.mark.parametrize("pipelining", [False, True], ids=["one_at_a_time", "pipelining"])
def test_only_the_batch_cut_short_is_in_doubt(
    sqlite_url: str, tmp_path: Path, pipelining: bool
) -> None:
    """Batches of 2, killed during the 1st message of the 2nd batch: the 1st batch was recorded
    `sent` and is not sent again (pipelined, its last message got its verdict before the record);
    only the row of the cut batch is resent (and counted)."""
    engine, received, _ = _three_receipts_and_a_kill(
        sqlite_url, tmp_path, kill_on=3, batch_size=2, pipelining=pipelining
    )
    assert received == [
        "payment_receipt:in_a",
        "payment_receipt:in_b",
        "payment_receipt:in_c",
        "payment_receipt:in_c",
    ]
    rows, outcomes = _resends_and_outcomes(engine)
    assert rows == {"in_a": 0, "in_b": 0, "in_c": 1}
    assert outcomes == {"in_a": ["sent"], "in_b": ["sent"], "in_c": ["sending", "resent"]}
    engine.dispose()
