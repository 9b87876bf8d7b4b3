"""SMTP PIPELINING (RFC 2920) against a real aiosmtpd server that offers it: MAIL, RCPT and DATA
go in one write; every refusal still fails only its own message, sends none of its content and
leaves the connection in step for the next; a server without PIPELINING gets one command at a
time; a dropped kept connection is replaced before anything of the message was sent, with
PIPELINING and without."""

from __future__ import annotations

import email
import re
import time
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from billhook.config import Settings
from billhook.effects import EffectDispatcher, effect_timeline
from billhook.effects.mailer import SmtpMailer, _content
from billhook.effects.render import OutgoingEmail, render_email
from billhook.store.engine import create_engine
from live_server import free_port
from test_effects_batching import Receipt, enqueue, settings_for, states
from test_effects_email import Clock

SENDER = "billing@billhook.localhost"
REFUSED_SENDER = "blocked@billhook.localhost"
REFUSED_RECIPIENT = "nobody@example.com"


class Server:
    """aiosmtpd's handler: offers PIPELINING (or not), refuses one sender and one recipient,
    and notes, when RCPT arrives, what the client had already sent after it."""

    def __init__(self, *, pipelining: bool = True) -> None:
        self.pipelining = pipelining
        self.received: list[tuple[tuple[str, int], Message, list[str]]] = []
        self.after_rcpt: list[bytes] = []
        self.refuse_content = False

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if not self.pipelining:
            return responses
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address == REFUSED_SENDER:
            return "550 5.7.1 sender blocked"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        # Bytes already waiting behind RCPT: "DATA\r\n" when the client pipelined.
        self.after_rcpt.append(bytes(server._reader._buffer))
        if address == REFUSED_RECIPIENT:
            return "550 5.1.1 no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.refuse_content:
            return "452 4.3.1 insufficient storage"
        parsed = email.message_from_bytes(envelope.content)
        self.received.append((session.peer, parsed, list(envelope.rcpt_tos)))
        return "250 OK"

    def subjects(self) -> list[str]:
        return [str(message["Subject"]) for _, message, _ in self.received]

    def connections(self) -> set[tuple[str, int]]:
        return {peer for peer, _, _ in self.received}


@pytest.fixture
def server() -> Iterator[tuple[Server, int]]:
    handler = Server()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield handler, controller.port
    controller.stop()


def message(subject: str, body: str = "Hello.\r\n") -> OutgoingEmail:
    raw = f"Subject: {subject}\r\nMessage-ID: <{subject}@billhook>\r\n\r\n{body}".encode()
    return OutgoingEmail(raw=raw, message_id=f"<{subject}@billhook>")


def test_the_envelope_goes_in_one_write_and_the_content_arrives_intact(
    server: tuple[Server, int],
) -> None:
    handler, port = server
    mailer = SmtpMailer(f"smtp://127.0.0.1:{port}")
    # A line that starts with a dot must arrive as written (dot-stuffing), the last line
    # without a line end gets one.
    body = "first line\r\n.a line starting with a dot\r\n..two dots\r\n.\r\nend"
    mailer.send(message("one", body), sender=SENDER, recipient="jane@example.com")
    mailer.send(message("two"), sender=SENDER, recipient="joe@example.com")
    mailer.close()

    assert handler.after_rcpt == [b"DATA\r\n", b"DATA\r\n"]
    assert handler.subjects() == ["one", "two"]
    assert len(handler.connections()) == 1
    first = handler.received[0][1].get_payload()
    assert first == body + "\r\n"
    assert [rcpt for _, _, rcpt in handler.received] == [["jane@example.com"], ["joe@example.com"]]


def test_a_server_without_pipelining_gets_one_command_at_a_time() -> None:
    handler = Server(pipelining=False)
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        mailer = SmtpMailer(f"smtp://127.0.0.1:{controller.port}")
        mailer.send(message("one"), sender=SENDER, recipient="jane@example.com")
        with pytest.raises(Exception, match="550"):
            mailer.send(message("refused"), sender=SENDER, recipient=REFUSED_RECIPIENT)
        mailer.send(message("two"), sender=SENDER, recipient="joe@example.com")
        mailer.close()
    finally:
        controller.stop()
    assert handler.after_rcpt == [b"", b"", b""]
    assert handler.subjects() == ["one", "two"]
    assert len(handler.connections()) == 1


@pytest.mark.parametrize(
    ("sender", "recipient", "error"),
    [
        (REFUSED_SENDER, "jane@example.com", "SMTPSenderRefused"),
        (SENDER, REFUSED_RECIPIENT, "SMTPRecipientsRefused"),
    ],
)
def test_a_refused_envelope_sends_nothing_and_the_connection_stays_in_step(
    server: tuple[Server, int], sender: str, recipient: str, error: str
) -> None:
    handler, port = server
    mailer = SmtpMailer(f"smtp://127.0.0.1:{port}")
    mailer.send(message("before"), sender=SENDER, recipient="jane@example.com")
    with pytest.raises(Exception) as refused:
        mailer.send(message("refused"), sender=sender, recipient=recipient)
    assert type(refused.value).__name__ == error and "550" in str(refused.value)
    mailer.send(message("after"), sender=SENDER, recipient="joe@example.com")
    mailer.close()
    assert handler.subjects() == ["before", "after"]
    assert len(handler.connections()) == 1


def test_refused_content_fails_its_message_only(server: tuple[Server, int]) -> None:
    handler, port = server
    mailer = SmtpMailer(f"smtp://127.0.0.1:{port}")
    handler.refuse_content = True
    with pytest.raises(Exception, match="452"):
        mailer.send(message("refused"), sender=SENDER, recipient="jane@example.com")
    handler.refuse_content = False
    mailer.send(message("after"), sender=SENDER, recipient="jane@example.com")
    mailer.close()
    assert handler.subjects() == ["after"]
    assert len(handler.connections()) == 1


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one_at_a_time"])
def test_a_dropped_kept_connection_is_replaced_without_failing_the_message(
    sqlite_url: str, tmp_path: Path, pipelining: bool
) -> None:
    handler = Server(pipelining=pipelining)
    # The server closes a connection idle for 0.3 s (aiosmtpd's `timeout`).
    controller = Controller(handler, hostname="127.0.0.1", port=free_port(), timeout=0.3)
    controller.start()
    engine = create_engine(sqlite_url)
    clock = Clock()
    try:
        settings = settings_for(
            sqlite_url, tmp_path, smtp_url=f"smtp://127.0.0.1:{controller.port}"
        )
        dispatcher = EffectDispatcher(engine, settings, clock=clock)
        enqueue(engine, settings, [Receipt("in_before")], clock.now)
        assert dispatcher.run_once() == 1
        time.sleep(1.0)  # the server has closed the kept connection by now
        enqueue(
            engine,
            settings,
            [Receipt("in_after"), Receipt("in_refused", REFUSED_RECIPIENT)],
            clock.now,
        )
        assert dispatcher.run_once() == 2
        dispatcher.close()
    finally:
        controller.stop()
    keys = [str(m["X-Billhook-Idempotency-Key"]) for _, m, _ in handler.received]
    assert keys == ["payment_receipt:in_before", "payment_receipt:in_after"]
    assert len(handler.connections()) == 2
    # What waited behind each RCPT: DATA when the client pipelined, nothing when it could not.
    assert handler.after_rcpt == [b"DATA\r\n" if pipelining else b""] * 3
    assert states(engine) == {"in_before": "sent", "in_after": "sent", "in_refused": "retryable"}
    (history,) = effect_timeline(engine, "in_after")
    assert [a.outcome for a in history.history] == ["sent"]
    engine.dispose()


@pytest.mark.parametrize(
    "raw",
    [b".starts with a dot\r\nx", b"a\r\n.b\r\n..c\r\n", b"no dots at line starts. a.b\r\n", b""],
)
def test_content_is_dot_stuffed_and_ended_as_smtplib_does(raw: bytes) -> None:
    expected = re.sub(rb"(?m)^\.", b"..", raw)
    if expected[-2:] != b"\r\n":
        expected += b"\r\n"
    assert _content(raw) == expected + b".\r\n"


def test_an_international_address_goes_command_by_command_with_smtputf8(tmp_path: Path) -> None:
    handler = Server()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port(), enable_SMTPUTF8=True)
    controller.start()
    try:
        rendered = render_email(
            kind="payment_receipt",
            idempotency_key="payment_receipt:in_utf8",
            payload={"invoice_id": "in_utf8", "currency": "eur", "amount": 1234},
            recipient="jöe@exämple.com",
            created_at=1_700_000_000.0,
            settings=Settings(database_url="sqlite://", data_dir=str(tmp_path)),
        )
        assert rendered.international
        mailer = SmtpMailer(f"smtp://127.0.0.1:{controller.port}")
        mailer.send(rendered, sender=SENDER, recipient="jöe@exämple.com")
        mailer.send(message("after"), sender=SENDER, recipient="jane@example.com")
        mailer.close()
    finally:
        controller.stop()
    # SMTPUTF8 goes through smtplib's own MAIL, one command at a time; the next is pipelined.
    assert handler.after_rcpt == [b"", b"DATA\r\n"]
    assert [rcpt for _, _, rcpt in handler.received] == [["jöe@exämple.com"], ["jane@example.com"]]
    assert len(handler.connections()) == 1
