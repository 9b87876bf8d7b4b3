"""Emails over a real SMTP server (aiosmtpd on 127.0.0.1): content, one per key, outage, redrive."""

from __future__ import annotations

import email
import mailbox
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY
from sqlalchemy.engine import Engine

from billhook.config import Settings
from billhook.effects import (
    EffectDispatcher,
    effect_timeline,
    effects_backlog,
    enqueue_effects,
    list_dead_effects,
    redrive_effect,
)
from billhook.effects.render import message_id
from billhook.store.engine import create_engine, transaction
from billhook.store.schema import effects, invoices
from live_server import free_port
from smtp_servers import SmtpHandler, received_message, running_smtp


@dataclass(frozen=True)
class Intent:
    kind: str
    idempotency_key: str
    payload: dict[str, Any] = field(default_factory=dict)


def receipt(invoice_id: str, currency: str, amount: int, **extra: Any) -> Intent:
    payload = {
        "invoice_id": invoice_id,
        "number": None,
        "currency": currency,
        "customer_email": "jane@example.com",
        "amount": amount,
        **extra,
    }
    return Intent("payment_receipt", f"payment_receipt:{invoice_id}", payload)


class Inbox(SmtpHandler):
    def __init__(self, *, pipelining: bool = False) -> None:
        super().__init__(pipelining=pipelining)
        self.messages: list[EmailMessage] = []
        self.recipients: list[list[str]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(received_message(envelope))
        self.recipients.append(list(envelope.rcpt_tos))
        return "250 OK"


@dataclass(frozen=True)
class SmtpServer:
    inbox: Inbox
    url: str


@pytest.fixture(params=[False, True], ids=["one_at_a_time", "pipelining"])
def smtp(request: pytest.FixtureRequest) -> Iterator[SmtpServer]:
    """An SMTP server without PIPELINING, and one offering it (the batch is then pipelined)."""
    inbox = Inbox(pipelining=request.param)
    with running_smtp(inbox) as url:
        yield SmtpServer(inbox, url)


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def settings_for(url: str, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": url,
        "data_dir": str(tmp_path / "data"),
        "retry_base_seconds": 0.01,
        "retry_max_seconds": 0.05,
        "max_attempts": 3,
    }
    return Settings(**{**values, **overrides})


def enqueue(engine: Engine, settings: Settings, intents: list[Intent], now: float) -> int:
    with transaction(engine) as connection:
        return enqueue_effects(
            connection,
            intents,
            invoice_id=intents[0].payload["invoice_id"],
            event_pk=None,
            now=now,
            settings=settings,
        )


def row(engine: Engine, key: str) -> sa.RowMapping:
    with engine.connect() as connection:
        return (
            connection.execute(sa.select(effects).where(effects.c.idempotency_key == key))
            .mappings()
            .one()
        )


def parts(message: EmailMessage) -> tuple[str, str]:
    text = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    assert text is not None and html is not None
    return str(text.get_content()), str(html.get_content())


def drain(dispatcher: EffectDispatcher, done: Callable[[], bool], clock: Clock) -> None:
    deadline = time.monotonic() + 20
    while not done():
        assert time.monotonic() < deadline, "effects did not settle"
        dispatcher.run_once()
        clock.now += 0.1  # past any backoff drawn from the tiny test policy


def test_one_email_per_key_with_stable_message_id_and_currency_formatting(
    sqlite_url: str, smtp: SmtpServer, tmp_path: Path
) -> None:
    engine = create_engine(sqlite_url)
    settings = settings_for(sqlite_url, tmp_path, smtp_url=smtp.url)
    clock = Clock()
    intents = [
        receipt("in_usd", "usd", 1234, number="INV-0007"),
        receipt("in_eur", "eur", 1234),
        receipt("in_jpy", "jpy", 1234),
    ]
    for intent in intents:
        enqueue(engine, settings, [intent], clock.now)
        enqueue(engine, settings, [intent], clock.now)  # a duplicate event: no second row

    dispatcher = EffectDispatcher(engine, settings, clock=clock)
    assert dispatcher.run_once() == 3
    assert dispatcher.run_once() == 0
    dispatcher.close()

    by_id = {m["X-Billhook-Idempotency-Key"]: m for m in smtp.inbox.messages}
    assert len(smtp.inbox.messages) == 3 and len(by_id) == 3
    expected = {"in_usd": "$12.34", "in_eur": "€12.34", "in_jpy": "¥1,234"}
    for intent in intents:
        invoice_id = intent.payload["invoice_id"]
        message = by_id[intent.idempotency_key]
        assert message["Message-ID"] == message_id(intent.idempotency_key, intent.kind)
        assert message["To"] == "jane@example.com"
        assert message["From"] == settings.mail_from
        assert invoice_id in message["Subject"] and expected[invoice_id] in message["Subject"]
        text, html = parts(message)
        for body in (text, html):
            assert invoice_id in body and expected[invoice_id] in body
        assert "<strong>" in html and "<" not in text
        assert row(engine, intent.idempotency_key)["state"] == "sent"
    assert "INV-0007" in by_id["payment_receipt:in_usd"]["Subject"]
    assert smtp.inbox.recipients == [["jane@example.com"]] * 3
    assert effects_backlog(engine) == 0
    engine.dispose()


def test_message_id_is_a_pure_function_of_the_key() -> None:
    first = message_id("payment_receipt:in_1", "payment_receipt")
    assert first == message_id("payment_receipt:in_1", "payment_receipt")
    assert first != message_id("payment_receipt:in_2", "payment_receipt")
    assert first.startswith("<") and first.endswith(".payment_receipt@billhook>")


def test_user_templates_override_the_packaged_ones(
    sqlite_url: str, smtp: SmtpServer, tmp_path: Path
) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "payment_receipt.subject.j2").write_text(
        "Paid: {{ invoice_label }} {{ amount_display }}"
    )
    engine = create_engine(sqlite_url)
    settings = settings_for(sqlite_url, tmp_path, smtp_url=smtp.url, templates_dir=str(templates))
    enqueue(engine, settings, [receipt("in_tpl", "usd", 500, number="N-1")], 1.0)
    EffectDispatcher(engine, settings).run_once()
    (message,) = smtp.inbox.messages
    assert message["Subject"] == "Paid: N-1 (in_tpl) $5.00"
    assert "in_tpl" in parts(message)[0]  # the text part still comes from the package default
    engine.dispose()


def test_smtp_outage_retries_with_backoff_then_dead_then_redrive_sends(
    sqlite_url: str, tmp_path: Path
) -> None:
    port = free_port()  # nothing listens here yet: connection refused
    engine = create_engine(sqlite_url)
    settings = settings_for(sqlite_url, tmp_path, smtp_url=f"smtp://127.0.0.1:{port}")
    clock = Clock()
    intent = receipt("in_down", "usd", 999)
    enqueue(engine, settings, [intent], clock.now)
    dead_before = (
        REGISTRY.get_sample_value(
            "billhook_effects_dead_total", {"channel": "email", "kind": "payment_receipt"}
        )
        or 0.0
    )
    dispatcher = EffectDispatcher(engine, settings, clock=clock)

    assert dispatcher.run_once() == 1
    first = row(engine, intent.idempotency_key)
    assert first["state"] == "retryable" and first["attempts"] == 1
    assert clock.now <= first["run_at"] <= clock.now + settings.retry_base_seconds
    assert "ConnectionRefusedError" in first["last_error"]

    drain(dispatcher, lambda: row(engine, intent.idempotency_key)["state"] == "dead", clock)
    dead = row(engine, intent.idempotency_key)
    assert dead["attempts"] == settings.max_attempts
    (listed,) = list_dead_effects(engine)
    assert listed.idempotency_key == intent.idempotency_key
    assert listed.kind == "payment_receipt" and listed.channel == "email"
    assert listed.attempts == 3 and "ConnectionRefusedError" in (listed.last_error or "")
    assert (
        REGISTRY.get_sample_value(
            "billhook_effects_dead_total", {"channel": "email", "kind": "payment_receipt"}
        )
        == dead_before + 1
    )

    inbox = Inbox()
    with running_smtp(inbox, port=port):
        redriven = redrive_effect(engine, listed.id, clock.now)
        assert redriven.id == listed.id
        assert row(engine, intent.idempotency_key)["state"] == "pending"
        assert dispatcher.run_once() == 1
        dispatcher.close()
    assert len(inbox.messages) == 1
    assert inbox.messages[0]["Message-ID"] == message_id(intent.idempotency_key, intent.kind)
    assert row(engine, intent.idempotency_key)["state"] == "sent"
    assert list_dead_effects(engine) == []
    (history,) = effect_timeline(engine, "in_down")
    assert [a.outcome for a in history.history] == ["failed", "failed", "failed", "sent"]
    assert [a.attempt for a in history.history] == [1, 2, 3, 4]
    engine.dispose()


def test_missing_customer_email_is_dead_at_once_and_redrive_uses_the_invoice_email(
    sqlite_url: str, smtp: SmtpServer, tmp_path: Path
) -> None:
    engine = create_engine(sqlite_url)
    settings = settings_for(sqlite_url, tmp_path, smtp_url=smtp.url)
    intent = receipt("in_noemail", "eur", 100, customer_email=None)
    enqueue(engine, settings, [intent], 1.0)
    dispatcher = EffectDispatcher(engine, settings)
    dispatcher.run_once()
    dead = row(engine, intent.idempotency_key)
    assert dead["state"] == "dead" and dead["attempts"] == 1
    assert "invoice in_noemail has no customer_email; set it and redrive" in dead["last_error"]
    assert smtp.inbox.messages == []

    with transaction(engine) as connection:
        connection.execute(
            sa.insert(invoices).values(
                id="in_noemail",
                source="stripe",
                state="{}",
                customer_email="late@example.com",
                created_at=2.0,
                updated_at=2.0,
            )
        )
    redrive_effect(engine, dead["id"], 3.0)
    dispatcher.run_once()
    dispatcher.close()
    (message,) = smtp.inbox.messages
    assert message["To"] == "late@example.com"
    assert row(engine, intent.idempotency_key)["state"] == "sent"
    engine.dispose()


def test_without_smtp_mail_goes_to_the_maildir_beside_the_database(
    sqlite_url: str, tmp_path: Path
) -> None:
    engine = create_engine(sqlite_url)
    settings = settings_for(sqlite_url, tmp_path, smtp_url="")
    intent = receipt("in_local", "jpy", 5000, number="L-1")
    enqueue(engine, settings, [intent], 1.0)
    dispatcher = EffectDispatcher(engine, settings)
    assert dispatcher.run_once() == 1
    assert dispatcher.run_once() == 0
    folder = mailbox.Maildir(settings.data_path / "maildir", create=False)
    (key,) = folder.keys()
    stored = email.message_from_bytes(folder.get_bytes(key), policy=default_policy)
    assert stored["Message-ID"] == message_id(intent.idempotency_key, intent.kind)
    assert "in_local" in stored["Subject"] and "¥5,000" in stored["Subject"]
    assert row(engine, intent.idempotency_key)["state"] == "sent"
    engine.dispose()


def test_run_forever_sends_what_arrives_and_stops_on_the_event(
    sqlite_url: str, smtp: SmtpServer, tmp_path: Path
) -> None:
    engine = create_engine(sqlite_url)
    settings = settings_for(sqlite_url, tmp_path, smtp_url=smtp.url, poll_interval_seconds=0.02)
    dispatcher = EffectDispatcher(engine, settings)
    stop = threading.Event()
    thread = threading.Thread(target=dispatcher.run_forever, args=(stop,))
    thread.start()
    try:
        enqueue(engine, settings, [receipt("in_loop", "usd", 100)], time.time())
        deadline = time.monotonic() + 10
        while not smtp.inbox.messages:
            assert time.monotonic() < deadline, "run_forever did not send"
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert row(engine, "payment_receipt:in_loop")["state"] == "sent"
    assert len(smtp.inbox.messages) == 1
    engine.dispose()


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_smtp_url_credentials_are_used_to_log_in(sqlite_url: str, tmp_path: Path) -> None:
    from aiosmtpd.smtp import AuthResult, LoginPassword

    logins: list[tuple[bytes, bytes]] = []

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
        assert isinstance(data, LoginPassword)
        logins.append((data.login, data.password))
        return AuthResult(success=data.login == b"billing" and data.password == b"p@ss:word")

    inbox = Inbox()
    port = free_port()
    with running_smtp(
        inbox, port=port, authenticator=authenticator, auth_required=True, auth_require_tls=False
    ):
        engine = create_engine(sqlite_url)
        settings = settings_for(
            sqlite_url, tmp_path, smtp_url=f"smtp://billing:p%40ss%3Aword@127.0.0.1:{port}"
        )
        enqueue(engine, settings, [receipt("in_auth", "usd", 100)], 1.0)
        dispatcher = EffectDispatcher(engine, settings)
        assert dispatcher.run_once() == 1
        dispatcher.close()
    assert logins == [(b"billing", b"p@ss:word")]
    assert len(inbox.messages) == 1
    assert row(engine, "payment_receipt:in_auth")["state"] == "sent"
    engine.dispose()
