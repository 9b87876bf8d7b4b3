"""The batched dispatcher on a real SMTP server (aiosmtpd) and a real Maildir: one connection
carries the batches, a refusal fails only its own message, a slow batch checkpoints (and never
hands over a row whose lease it lost). A dropped connection being replaced is in
test_effects_pipelining.py, with PIPELINING and without."""

from __future__ import annotations

import mailbox
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from billhook.config import Settings
from billhook.effects import EffectDispatcher, effect_timeline, enqueue_effects
from billhook.effects.mailer import MaildirMailer
from billhook.effects.render import OutgoingEmail
from billhook.store.engine import create_engine, transaction
from billhook.store.schema import effects
from smtp_servers import SmtpHandler, received_message, running_smtp, sent_behind
from test_effects_email import Clock
from test_effects_email import settings_for as email_settings_for

REFUSED = "nobody@example.com"


class Receipt:
    kind = "payment_receipt"

    def __init__(self, invoice_id: str, email_address: str = "jane@example.com") -> None:
        self.idempotency_key = f"payment_receipt:{invoice_id}"
        self.payload: dict[str, Any] = {
            "invoice_id": invoice_id,
            "number": None,
            "currency": "usd",
            "customer_email": email_address,
            "amount": 1500,
        }


class Inbox(SmtpHandler):
    """Accepts everything but `REFUSED`; notes which client connection carried each message."""

    def __init__(self, *, pipelining: bool = False) -> None:
        super().__init__(pipelining=pipelining)
        self.received: list[tuple[tuple[str, int], EmailMessage]] = []
        self.refuse = True

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if self.refuse and address == REFUSED:
            return "550 5.1.1 no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append((session.peer, received_message(envelope)))
        return "250 OK"

    def keys(self) -> list[str]:
        return [str(m["X-Billhook-Idempotency-Key"]) for _, m in self.received]

    def connections(self) -> set[tuple[str, int]]:
        return {peer for peer, _ in self.received}


def settings_for(url: str, tmp_path: Path, **overrides: Any) -> Settings:
    return email_settings_for(
        url,
        tmp_path,
        **{"lease_seconds": 60.0, "max_attempts": Settings().max_attempts, **overrides},
    )


def enqueue(engine: Engine, settings: Settings, receipts: list[Receipt], now: float) -> None:
    with transaction(engine) as connection:
        for receipt in receipts:
            enqueue_effects(
                connection,
                [receipt],
                invoice_id=receipt.payload["invoice_id"],
                event_pk=None,
                now=now,
                settings=settings,
            )


def states(engine: Engine) -> dict[str, str]:
    with engine.connect() as connection:
        return dict(connection.execute(sa.select(effects.c.invoice_id, effects.c.state)).all())


def test_one_connection_carries_the_batches_and_a_refusal_fails_only_its_message(
    database_url: str, tmp_path: Path
) -> None:
    inbox = Inbox()
    engine = create_engine(database_url)
    clock = Clock()
    with running_smtp(inbox) as smtp_url:
        settings = settings_for(database_url, tmp_path, smtp_url=smtp_url)
        receipts = [Receipt(f"in_{n}") for n in range(5)]
        receipts.insert(2, Receipt("in_refused", REFUSED))
        enqueue(engine, settings, receipts, clock.now)
        dispatcher = EffectDispatcher(engine, settings, clock=clock)

        assert dispatcher.run_once() == 6
        assert sorted(inbox.keys()) == sorted(f"payment_receipt:in_{n}" for n in range(5))
        assert len(inbox.connections()) == 1
        assert states(engine) == {
            **{f"in_{n}": "sent" for n in range(5)},
            "in_refused": "retryable",
        }
        with engine.connect() as connection:
            error = connection.execute(
                sa.select(effects.c.last_error).where(effects.c.invoice_id == "in_refused")
            ).scalar_one()
        assert "SMTPRecipientsRefused" in error and "550" in error

        # The next batch (the retry, once the mailbox exists) rides the same connection.
        inbox.refuse = False
        clock.now += 1
        assert dispatcher.run_once() == 1
        dispatcher.close()
    assert states(engine)["in_refused"] == "sent"
    assert inbox.keys()[-1] == "payment_receipt:in_refused"
    assert len(inbox.connections()) == 1
    (history,) = effect_timeline(engine, "in_refused")
    assert [a.outcome for a in history.history] == ["failed", "sent"]
    engine.dispose()


class SlowMaildir:
    """The real Maildir mailer on a server so slow that each hand-over takes `seconds` of the
    dispatcher's clock; `during` runs inside the first hand-over (a rival, an observer)."""

    def __init__(self, path: Path, clock: Clock, seconds: float, during: Any = None) -> None:
        self._inner = MaildirMailer(path)
        self._clock = clock
        self._seconds = seconds
        self._during = during
        self.sent = 0

    @property
    def description(self) -> str:
        return "slow maildir"

    def send(self, message: OutgoingEmail, *, sender: str, recipient: str) -> None:
        self._inner.send(message, sender=sender, recipient=recipient)
        self.sent += 1
        self._clock.now += self._seconds
        if self._during is not None:
            self._during(self.sent)

    def close(self) -> None:
        return None


def maildir_keys(path: Path) -> list[str]:
    return sorted(str(m["X-Billhook-Idempotency-Key"]) for m in mailbox.Maildir(path, create=False))


def test_a_slow_batch_records_its_progress_and_renews_the_rest_of_its_lease(
    database_url: str, tmp_path: Path
) -> None:
    engine = create_engine(database_url)
    clock = Clock()
    settings = settings_for(database_url, tmp_path)
    lease = settings.lease_seconds
    enqueue(engine, settings, [Receipt(f"in_{n}") for n in range(3)], clock.now)
    seen: list[dict[str, str]] = []
    # Each hand-over takes 0.4 of the lease: the batch would outlive its lease without renewal.
    mailer = SlowMaildir(
        tmp_path / "maildir", clock, 0.4 * lease, lambda _: seen.append(states(engine))
    )
    dispatcher = EffectDispatcher(engine, settings, clock=clock, mailer=mailer)
    assert dispatcher.run_once() == 3
    # Before the 3rd hand-over (past half the lease) the first two were committed `sent`.
    assert seen[1] == {"in_0": "sending", "in_1": "sending", "in_2": "sending"}
    assert seen[2] == {"in_0": "sent", "in_1": "sent", "in_2": "sending"}
    assert states(engine) == {"in_0": "sent", "in_1": "sent", "in_2": "sent"}
    assert maildir_keys(tmp_path / "maildir") == [f"payment_receipt:in_{n}" for n in range(3)]
    with engine.connect() as connection:
        resends = connection.execute(sa.select(sa.func.sum(effects.c.resends))).scalar_one()
    assert resends == 0
    engine.dispose()


def test_a_row_whose_lease_was_lost_mid_batch_is_not_handed_over_by_the_old_dispatcher(
    sqlite_url: str, tmp_path: Path
) -> None:
    """The first hand-over outlives the whole lease; meanwhile another dispatcher reclaims the
    batch (all in doubt) and sends it. The first dispatcher then sends nothing more."""
    engine = create_engine(sqlite_url)
    clock = Clock()
    settings = settings_for(sqlite_url, tmp_path)
    enqueue(engine, settings, [Receipt(f"in_{n}") for n in range(3)], clock.now)
    maildir = tmp_path / "maildir"

    def rival_takes_over(sent: int) -> None:
        if sent == 1:
            rival = EffectDispatcher(engine, settings, clock=clock, mailer=MaildirMailer(maildir))
            assert rival.run_once() == 3

    slow = SlowMaildir(maildir, clock, settings.lease_seconds + 1, rival_takes_over)
    EffectDispatcher(engine, settings, clock=clock, mailer=slow).run_once()
    assert slow.sent == 1
    # in_0: once by the slow dispatcher, once (in doubt) by the rival; the others once each.
    assert maildir_keys(maildir) == [
        "payment_receipt:in_0",
        "payment_receipt:in_0",
        "payment_receipt:in_1",
        "payment_receipt:in_2",
    ]
    assert states(engine) == {"in_0": "sent", "in_1": "sent", "in_2": "sent"}
    outcomes = {
        invoice_id: [a.outcome for a in effect_timeline(engine, invoice_id)[0].history]
        for invoice_id in ("in_0", "in_1", "in_2")
    }
    # The slow dispatcher's late outcome closes its own attempt honestly, the row stays the
    # rival's; in_1 and in_2 were in doubt for the rival (never handed over, resent once).
    assert outcomes == {
        "in_0": ["sent", "resent"],
        "in_1": ["sending", "resent"],
        "in_2": ["sending", "resent"],
    }
    engine.dispose()


class SlowPipelinedInbox(Inbox):
    """Offers PIPELINING; each message's content costs `seconds` of the dispatcher's clock, and
    notes the rows' states and what the client had already sent behind it."""

    def __init__(self, engine: Engine, clock: Clock, seconds: float) -> None:
        super().__init__(pipelining=True)
        self._engine = engine
        self._clock = clock
        self._seconds = seconds
        self.seen: list[dict[str, str]] = []
        self.behind: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.seen.append(states(self._engine))
        self.behind.append(sent_behind(server))
        self._clock.now += self._seconds
        return await super().handle_DATA(server, session, envelope)


def test_a_slow_pipelined_batch_settles_the_waiting_message_before_its_checkpoint(
    database_url: str, tmp_path: Path
) -> None:
    """Each content takes 0.3 of the lease. Before the 4th hand-over (past half the lease) the
    3rd message, waiting for its content, gets it alone and its verdict, and is committed `sent`
    with the checkpoint; the 4th's envelope then goes alone."""
    engine = create_engine(database_url)
    clock = Clock()
    settings = settings_for(database_url, tmp_path)
    inbox = SlowPipelinedInbox(engine, clock, 0.3 * settings.lease_seconds)
    with running_smtp(inbox) as smtp_url:
        settings = settings_for(database_url, tmp_path, smtp_url=smtp_url)
        enqueue(engine, settings, [Receipt(f"in_{n}") for n in range(4)], clock.now)
        dispatcher = EffectDispatcher(engine, settings, clock=clock)
        assert dispatcher.run_once() == 4
        dispatcher.close()
    assert inbox.keys() == [f"payment_receipt:in_{n}" for n in range(4)]
    assert len(inbox.connections()) == 1
    sending = {f"in_{n}": "sending" for n in range(4)}
    assert inbox.seen == [
        sending,
        sending,
        sending,
        {"in_0": "sent", "in_1": "sent", "in_2": "sent", "in_3": "sending"},
    ]
    # in_1's and in_2's envelopes went behind the contents before them; in_2's content went
    # alone (the checkpoint came next), and so did in_3's, the last.
    assert [behind.startswith(b"MAIL FROM:") for behind in inbox.behind] == [
        True,
        True,
        False,
        False,
    ]
    assert inbox.behind[2:] == [b"", b""]
    assert states(engine) == {f"in_{n}": "sent" for n in range(4)}
    with engine.connect() as connection:
        resends = connection.execute(sa.select(sa.func.sum(effects.c.resends))).scalar_one()
    assert resends == 0
    engine.dispose()
