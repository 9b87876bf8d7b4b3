"""SMTP PIPELINING (RFC 2920) against a real aiosmtpd server that offers it: MAIL, RCPT and DATA
go in one write; every refusal still fails only its own message, sends none of its content and
leaves the connection in step for the next; a server without PIPELINING gets one command at a
time; a dropped kept connection is replaced before anything of the message was sent, with
PIPELINING and without. In a batch (`hand` / `settle`, the dispatcher), a message's content goes
in the same write as the next message's envelope: one round trip a message, each message still
sent only on its own final 250; a connection lost after a message's content fails that message,
and the message pipelined behind it starts again on a new connection."""

from __future__ import annotations

import asyncio
import email
import re
import time
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from billhook.config import Settings
from billhook.effects import EffectDispatcher, effect_timeline
from billhook.effects.render import OutgoingEmail, render_email
from billhook.effects.smtp import SmtpMailer, Verdict, _content
from billhook.store.engine import create_engine
from billhook.store.schema import effects
from smtp_servers import SmtpHandler, running_smtp, sent_behind
from test_effects_batching import Receipt, enqueue, settings_for, states
from test_effects_email import Clock

SENDER = "billing@billhook.localhost"
REFUSED_SENDER = "blocked@billhook.localhost"
REFUSED_RECIPIENT = "nobody@example.com"


class Server(SmtpHandler):
    """aiosmtpd's handler: offers PIPELINING (or not), refuses one sender and one recipient,
    and notes, when RCPT arrives, what the client had already sent after it; `commands` notes
    each command (the end of a message's content as "content") with its connection and the
    bytes already waiting behind it. `actions` names messages (by subject, or by invoice id) to
    refuse ("refuse": 554 to the content), to drop the connection at ("drop": no reply), or to
    answer only after `stall_seconds` ("stall"); after a drop, with `closed_after_drop`, every
    MAIL is refused 421."""

    def __init__(self, *, pipelining: bool = True) -> None:
        super().__init__(pipelining=pipelining)
        self.received: list[tuple[tuple[str, int], Message, list[str]]] = []
        self.after_rcpt: list[bytes] = []
        self.commands: list[tuple[str, tuple[str, int], bytes]] = []
        self.refuse_content = False
        self.actions: dict[str, str] = {}
        self.stall_seconds = 0.0
        self.closed_after_drop = False
        self.dropped = False

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self._note("MAIL", server, session)
        if address == REFUSED_SENDER:
            return "550 5.7.1 sender blocked"
        if self.dropped and self.closed_after_drop:
            return "421 4.3.2 service shutting down"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self._note("RCPT", server, session)
        # Bytes already waiting behind RCPT: "DATA\r\n" when the client pipelined.
        self.after_rcpt.append(sent_behind(server))
        if address == REFUSED_RECIPIENT:
            return "550 5.1.1 no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_RSET(self, server: Any, session: Any, envelope: Any) -> str:
        self._note("RSET", server, session)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self._note("content", server, session)
        if self.refuse_content:
            return "452 4.3.1 insufficient storage"
        parsed = email.message_from_bytes(envelope.content)
        action = self.actions.get(name(parsed))
        if action == "refuse":
            return "554 5.6.0 message refused"
        if action == "drop":
            # The connection goes, the message's verdict never leaves the server.
            self.dropped = True
            server.transport.abort()
            return "250 OK"
        self.received.append((session.peer, parsed, list(envelope.rcpt_tos)))
        if action == "stall":
            # Taken, but answered too late (the client may have gone by then).
            await asyncio.sleep(self.stall_seconds)
        return "250 OK"

    def _note(self, command: str, server: Any, session: Any) -> None:
        self.commands.append((command, session.peer, sent_behind(server)))

    def subjects(self) -> list[str]:
        return [str(message["Subject"]) for _, message, _ in self.received]

    def names(self) -> list[str]:
        return [name(message) for _, message, _ in self.received]

    def connections(self) -> set[tuple[str, int]]:
        return {peer for peer, _, _ in self.received}


def name(message: Message) -> str:
    """A test message's subject, or a receipt's invoice id."""
    key = message["X-Billhook-Idempotency-Key"]
    return str(key).removeprefix("payment_receipt:") if key else str(message["Subject"])


@pytest.fixture
def server() -> Iterator[tuple[Server, str]]:
    handler = Server()
    with running_smtp(handler) as url:
        yield handler, url


def message(subject: str, body: str = "Hello.\r\n") -> OutgoingEmail:
    raw = f"Subject: {subject}\r\nMessage-ID: <{subject}@billhook>\r\n\r\n{body}".encode()
    return OutgoingEmail(raw=raw, message_id=f"<{subject}@billhook>")


def test_the_envelope_goes_in_one_write_and_the_content_arrives_intact(
    server: tuple[Server, str],
) -> None:
    handler, url = server
    mailer = SmtpMailer(url)
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
    with running_smtp(handler) as url:
        mailer = SmtpMailer(url)
        mailer.send(message("one"), sender=SENDER, recipient="jane@example.com")
        with pytest.raises(Exception, match="550"):
            mailer.send(message("refused"), sender=SENDER, recipient=REFUSED_RECIPIENT)
        mailer.send(message("two"), sender=SENDER, recipient="joe@example.com")
        mailer.close()
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
    server: tuple[Server, str], sender: str, recipient: str, error: str
) -> None:
    handler, url = server
    mailer = SmtpMailer(url)
    mailer.send(message("before"), sender=SENDER, recipient="jane@example.com")
    with pytest.raises(Exception) as refused:
        mailer.send(message("refused"), sender=sender, recipient=recipient)
    assert type(refused.value).__name__ == error and "550" in str(refused.value)
    mailer.send(message("after"), sender=SENDER, recipient="joe@example.com")
    mailer.close()
    assert handler.subjects() == ["before", "after"]
    assert len(handler.connections()) == 1


def test_refused_content_fails_its_message_only(server: tuple[Server, str]) -> None:
    handler, url = server
    mailer = SmtpMailer(url)
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
    engine = create_engine(sqlite_url)
    clock = Clock()
    # The server closes a connection idle for 0.3 s (aiosmtpd's `timeout`).
    with running_smtp(handler, timeout=0.3) as url:
        settings = settings_for(sqlite_url, tmp_path, smtp_url=url)
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


def international_receipt(tmp_path: Path) -> OutgoingEmail:
    """A receipt (invoice in_utf8) to a non-ASCII address, which needs SMTPUTF8."""
    return render_email(
        kind="payment_receipt",
        idempotency_key="payment_receipt:in_utf8",
        payload={"invoice_id": "in_utf8", "currency": "eur", "amount": 1234},
        recipient="jöe@exämple.com",
        created_at=1_700_000_000.0,
        settings=Settings(database_url="sqlite://", data_dir=str(tmp_path)),
    )


def test_an_international_address_goes_command_by_command_with_smtputf8(tmp_path: Path) -> None:
    handler = Server()
    rendered = international_receipt(tmp_path)
    assert rendered.international
    with running_smtp(handler, enable_SMTPUTF8=True) as url:
        mailer = SmtpMailer(url)
        mailer.send(rendered, sender=SENDER, recipient="jöe@exämple.com")
        mailer.send(message("after"), sender=SENDER, recipient="jane@example.com")
        mailer.close()
    # SMTPUTF8 goes through smtplib's own MAIL, one command at a time; the next is pipelined.
    assert handler.after_rcpt == [b"", b"DATA\r\n"]
    assert [rcpt for _, _, rcpt in handler.received] == [["jöe@exämple.com"], ["jane@example.com"]]
    assert len(handler.connections()) == 1


def envelope(recipient: str, raw: bytes, sender: str = SENDER) -> bytes:
    """MAIL, RCPT and DATA as the client pipelines them (aiosmtpd offers SIZE)."""
    return f"MAIL FROM:<{sender}> SIZE={len(raw)}\r\nRCPT TO:<{recipient}>\r\nDATA\r\n".encode()


def outcomes(verdicts: list[Verdict]) -> list[tuple[str, str | None]]:
    """(subject, error type or None) of each verdict."""
    return [
        (
            str(email.message_from_bytes(v.message.raw)["Subject"]),
            None if v.error is None else type(v.error).__name__,
        )
        for v in verdicts
    ]


def test_a_batch_costs_one_round_trip_a_message(server: tuple[Server, str]) -> None:
    """Each message's content and the next message's envelope reach the server together,
    before it answered the content: the client waited once a message (and once more for the
    last content), and each message has its own verdict."""
    handler, url = server
    mailer = SmtpMailer(url)
    one, two, three = message("one"), message("two"), message("three")
    assert mailer.hand(one, sender=SENDER, recipient="a@example.com") == []
    assert outcomes(mailer.hand(two, sender=SENDER, recipient="b@example.com")) == [("one", None)]
    assert outcomes(mailer.hand(three, sender=SENDER, recipient="c@example.com")) == [("two", None)]
    assert outcomes(mailer.settle()) == [("three", None)]
    assert mailer.settle() == []
    mailer.close()

    assert handler.subjects() == ["one", "two", "three"]
    assert len(handler.connections()) == 1
    rcpt, data = b"RCPT TO:<%s>\r\nDATA\r\n", b"DATA\r\n"
    assert [(command, behind) for command, _, behind in handler.commands] == [
        ("MAIL", rcpt % b"a@example.com"),
        ("RCPT", data),
        ("content", envelope("b@example.com", two.raw)),
        ("MAIL", rcpt % b"b@example.com"),
        ("RCPT", data),
        ("content", envelope("c@example.com", three.raw)),
        ("MAIL", rcpt % b"c@example.com"),
        ("RCPT", data),
        ("content", b""),
    ]


def test_a_refused_content_fails_its_message_while_the_next_envelope_is_already_sent(
    server: tuple[Server, str],
) -> None:
    handler, url = server
    handler.actions = {"refused": "refuse"}
    mailer = SmtpMailer(url)
    refused, after = message("refused"), message("after")
    assert outcomes(mailer.hand(message("before"), sender=SENDER, recipient="a@example.com")) == []
    assert outcomes(mailer.hand(refused, sender=SENDER, recipient="b@example.com")) == [
        ("before", None)
    ]
    verdicts = mailer.hand(after, sender=SENDER, recipient="c@example.com")
    assert outcomes(verdicts) == [("refused", "SMTPDataError")]
    assert "554" in str(verdicts[0].error)
    assert outcomes(mailer.settle()) == [("after", None)]
    mailer.close()

    assert handler.subjects() == ["before", "after"]
    assert len(handler.connections()) == 1
    # The refusal was the 554 to the content; "after"'s envelope was already behind it, and is
    # answered as it came: no RSET anywhere.
    commands = [(command, behind) for command, _, behind in handler.commands]
    assert [command for command, _ in commands] == ["MAIL", "RCPT", "content"] * 3
    assert commands[5] == ("content", envelope("c@example.com", after.raw))


def test_the_message_behind_a_dropped_connection_is_not_sent_without_its_own_250(
    server: tuple[Server, str],
) -> None:
    """The server drops the connection after "dropped"'s content, with "behind"'s envelope
    already sent: "dropped" fails (its verdict never came), "behind" starts again on a new
    connection, where the server refuses it: it fails too, nothing of it having been accepted."""
    handler, url = server
    handler.actions = {"dropped": "drop"}
    handler.closed_after_drop = True
    mailer = SmtpMailer(url)
    dropped, behind = message("dropped"), message("behind")
    assert mailer.hand(dropped, sender=SENDER, recipient="a@example.com") == []
    verdicts = mailer.hand(behind, sender=SENDER, recipient="b@example.com")
    assert outcomes(verdicts) == [
        ("dropped", "SMTPServerDisconnected"),
        ("behind", "SMTPSenderRefused"),
    ]
    assert "421" in str(verdicts[1].error)
    assert mailer.settle() == []
    mailer.close()

    assert handler.received == []
    first = handler.commands[0][1]
    # "behind"'s envelope went behind "dropped"'s content, and was never answered there; it
    # was sent again on a second connection, where MAIL was refused.
    assert ("content", first, envelope("b@example.com", behind.raw)) in handler.commands
    assert [(c, peer == first) for c, peer, _ in handler.commands] == [
        ("MAIL", True),
        ("RCPT", True),
        ("content", True),
        ("MAIL", False),
        ("RSET", False),
    ]


def test_an_international_message_goes_alone_between_pipelined_ones(tmp_path: Path) -> None:
    """The message waiting for its content is settled alone (nothing behind its content), the
    SMTPUTF8 one goes command by command, and the next one is pipelined again."""
    handler = Server()
    rendered = international_receipt(tmp_path)
    with running_smtp(handler, enable_SMTPUTF8=True) as url:
        mailer = SmtpMailer(url)
        assert mailer.hand(message("before"), sender=SENDER, recipient="a@example.com") == []
        before, international = mailer.hand(rendered, sender=SENDER, recipient="jöe@exämple.com")
        assert outcomes([before]) == [("before", None)]
        assert international == Verdict(rendered, None)
        assert mailer.hand(message("after"), sender=SENDER, recipient="b@example.com") == []
        assert outcomes(mailer.settle()) == [("after", None)]
        mailer.close()
    assert [name(m) for _, m, _ in handler.received] == ["before", "in_utf8", "after"]
    assert len(handler.connections()) == 1
    behind = [b for command, _, b in handler.commands if command in ("RCPT", "content")]
    assert behind == [b"DATA\r\n", b"", b"", b"", b"DATA\r\n", b""]


def test_closing_with_a_message_waiting_drops_it_unsent_at_once(
    server: tuple[Server, str],
) -> None:
    """The server reads content after DATA's 354: closing then sends no QUIT (it would be read
    as content, and its answer waited for until the timeout) and the message is not sent."""
    handler, url = server
    mailer = SmtpMailer(url, timeout=10.0)
    assert mailer.hand(message("waiting"), sender=SENDER, recipient="a@example.com") == []
    started = time.monotonic()
    mailer.close()
    assert time.monotonic() - started < 5.0
    assert mailer.settle() == []
    mailer.send(message("after"), sender=SENDER, recipient="b@example.com")
    mailer.close()
    assert handler.subjects() == ["after"]
    assert [command for command, _, _ in handler.commands] == [
        *["MAIL", "RCPT"],
        *["MAIL", "RCPT", "content"],
    ]


def dispatch(
    handler: Server,
    url: str,
    tmp_path: Path,
    invoices: list[str],
    timeout: float = 10.0,
) -> Engine:
    """Run one batch of receipts (one per invoice id) through the dispatcher into `handler`."""
    engine = create_engine(url)
    clock = Clock()
    with running_smtp(handler) as smtp_url:
        settings = settings_for(url, tmp_path, smtp_url=smtp_url)
        enqueue(
            engine,
            settings,
            [
                Receipt(i, REFUSED_RECIPIENT if "rcpt" in i else "jane@example.com")
                for i in invoices
            ],
            clock.now,
        )
        mailer = SmtpMailer(settings.smtp_url, timeout=timeout)
        dispatcher = EffectDispatcher(engine, settings, clock=clock, mailer=mailer)
        assert dispatcher.run_once() == len(invoices)
        dispatcher.close()
    return engine


def attempts(engine: Engine, invoices: list[str]) -> dict[str, list[str]]:
    return {i: [a.outcome for a in effect_timeline(engine, i)[0].history] for i in invoices}


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one_at_a_time"])
def test_a_batch_with_refusals_fails_only_the_refused_messages(
    database_url: str, tmp_path: Path, pipelining: bool
) -> None:
    """A refused recipient (answered at RCPT) and a refused content (answered at the end of the
    content, the next envelope already behind it when pipelining) each fail their own message;
    every other message of the batch is sent, one connection. Without PIPELINING nothing ever
    waits behind a command."""
    handler = Server(pipelining=pipelining)
    handler.actions = {"in_refused": "refuse"}
    invoices = ["in_0", "in_rcpt", "in_1", "in_refused", "in_2"]
    engine = dispatch(handler, database_url, tmp_path, invoices)
    assert handler.names() == ["in_0", "in_1", "in_2"]
    assert len(handler.connections()) == 1
    assert states(engine) == {
        "in_0": "sent",
        "in_rcpt": "retryable",
        "in_1": "sent",
        "in_refused": "retryable",
        "in_2": "sent",
    }
    assert attempts(engine, invoices) == {
        "in_0": ["sent"],
        "in_rcpt": ["failed"],
        "in_1": ["sent"],
        "in_refused": ["failed"],
        "in_2": ["sent"],
    }
    with engine.connect() as connection:
        errors = dict(
            connection.execute(
                sa.select(effects.c.invoice_id, effects.c.last_error).where(
                    effects.c.state == "retryable"
                )
            ).all()
        )
    assert errors["in_rcpt"].startswith("SMTPRecipientsRefused") and "550" in errors["in_rcpt"]
    assert errors["in_refused"].startswith("SMTPDataError") and "554" in errors["in_refused"]
    # A refused RCPT is followed by RSET (pipelined, its DATA was refused too: 503), to put the
    # session back in step. A refused content is not, when the next envelope is behind it.
    refused_content = ["MAIL", "RCPT", "content"] + ([] if pipelining else ["RSET"])
    assert [command for command, _, _ in handler.commands] == [
        *["MAIL", "RCPT", "content"],
        *["MAIL", "RCPT", "RSET"],
        *["MAIL", "RCPT", "content"],
        *refused_content,
        *["MAIL", "RCPT", "content"],
    ]
    behind_contents = [
        re.sub(rb"SIZE=\d+", b"SIZE=n", behind)
        for command, _, behind in handler.commands
        if command == "content"
    ]
    if pipelining:
        # Behind every content but the last: the next envelope, sent before its verdict came.
        next_envelope = b"MAIL FROM:<billing@billhook.localhost> SIZE=n\r\nRCPT TO:<%s>\r\nDATA\r\n"
        assert behind_contents == [
            next_envelope % REFUSED_RECIPIENT.encode(),
            next_envelope % b"jane@example.com",
            next_envelope % b"jane@example.com",
            b"",
        ]
    else:
        assert all(behind == b"" for _, _, behind in handler.commands)
    engine.dispose()


@pytest.mark.parametrize("lost", ["drop", "stall"], ids=["dropped", "timed_out"])
def test_a_connection_lost_after_a_message_content_fails_that_message_only(
    sqlite_url: str, tmp_path: Path, lost: str
) -> None:
    """The connection is lost after in_1's content, in_2's envelope behind it: dropped by the
    server, or no verdict within the mailer's timeout. in_1 fails as a message sent alone does
    (retryable; when the server did take it, the retry sends it again under the same key);
    in_2 is not sent on the lost connection but starts again on a new one, with in_3."""
    handler = Server()
    handler.actions = {"in_1": lost}
    handler.stall_seconds = 1.5
    invoices = ["in_0", "in_1", "in_2", "in_3"]
    engine = dispatch(handler, sqlite_url, tmp_path, invoices, timeout=0.5)
    # A stalled in_1 was taken by the server, which answered after the client gave up on it.
    assert handler.names() == (
        ["in_0", "in_2", "in_3"] if lost == "drop" else ["in_0", "in_1", "in_2", "in_3"]
    )
    peers = {name(message): peer for peer, message, _ in handler.received}
    assert peers["in_0"] != peers["in_2"] == peers["in_3"]
    # in_2's envelope had gone behind in_1's content, on the first connection.
    (behind,) = [b for c, p, b in handler.commands if c == "content" and p == peers["in_0"]][1:]
    assert b"MAIL FROM:" in behind
    assert states(engine) == {"in_0": "sent", "in_1": "retryable", "in_2": "sent", "in_3": "sent"}
    assert attempts(engine, invoices) == {
        "in_0": ["sent"],
        "in_1": ["failed"],
        "in_2": ["sent"],
        "in_3": ["sent"],
    }
    with engine.connect() as connection:
        error = connection.execute(
            sa.select(effects.c.last_error).where(effects.c.invoice_id == "in_1")
        ).scalar_one()
    assert error.startswith("SMTPServerDisconnected")
    engine.dispose()


class FailingClock(Clock):
    """The dispatcher's clock; its `fail_on`-th reading raises (a bug cutting a batch short)."""

    def __init__(self, fail_on: int) -> None:
        super().__init__()
        self.readings = 0
        self.fail_on = fail_on

    def __call__(self) -> float:
        self.readings += 1
        if self.readings == self.fail_on:
            raise RuntimeError("the clock broke")
        return self.now


def test_a_batch_cut_short_sends_no_content_of_the_message_waiting_for_it(
    sqlite_url: str, tmp_path: Path
) -> None:
    """An error after in_0's envelope was accepted and before its content went (the clock
    read before in_1 is handed over): nothing of the batch is recorded, in_0's content is
    never sent, and once the lease is over the batch is in doubt and sent again, counted."""
    handler = Server()
    engine = create_engine(sqlite_url)
    # Readings: the claim, the batch's renewal time, then one before each hand-over.
    clock = FailingClock(fail_on=4)
    with running_smtp(handler) as url:
        settings = settings_for(sqlite_url, tmp_path, smtp_url=url)
        enqueue(engine, settings, [Receipt("in_0"), Receipt("in_1")], clock.now)
        dispatcher = EffectDispatcher(engine, settings, clock=clock)
        with pytest.raises(RuntimeError, match="the clock broke"):
            dispatcher.run_once()
        assert handler.received == []
        assert states(engine) == {"in_0": "sending", "in_1": "sending"}
        clock.now += settings.lease_seconds + 1
        assert dispatcher.run_once() == 2
        dispatcher.close()
    assert handler.names() == ["in_0", "in_1"]
    assert [command for command, _, _ in handler.commands][:2] == ["MAIL", "RCPT"]
    assert states(engine) == {"in_0": "sent", "in_1": "sent"}
    assert attempts(engine, ["in_0", "in_1"]) == {
        "in_0": ["sending", "resent"],
        "in_1": ["sending", "resent"],
    }
    engine.dispose()
