"""The outbox on SQLite and PostgreSQL: enqueue is idempotent, concurrent dispatchers send once."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from billhook.config import Settings
from billhook.effects import (
    EffectDispatcher,
    effect_timeline,
    effects_backlog,
    enqueue_effects,
    redrive_effect,
)
from billhook.errors import InvalidRequest, NotFound
from billhook.store.engine import transaction
from billhook.store.schema import effects
from smtp_servers import SmtpHandler, running_smtp


@dataclass(frozen=True)
class Intent:
    kind: str
    idempotency_key: str
    payload: dict[str, Any]


def intent(n: int) -> Intent:
    return Intent(
        "payment_failed_notice",
        f"payment_failed_notice:in_ob:{n}",
        {
            "invoice_id": "in_ob",
            "number": "OB-1",
            "currency": "usd",
            "customer_email": "ops@example.com",
            "amount": 1000,
            "attempt": n,
        },
    )


def enqueue(engine: Engine, settings: Settings, intents: list[Intent]) -> int:
    with transaction(engine) as connection:
        return enqueue_effects(
            connection, intents, invoice_id="in_ob", event_pk=None, now=10.0, settings=settings
        )


def test_enqueue_is_idempotent_per_key(engine: Engine, tmp_path: Path) -> None:
    plain = Settings(data_dir=str(tmp_path))
    with_webhook = Settings(
        data_dir=str(tmp_path),
        effect_webhook_url="http://127.0.0.1:9/hook",
        effect_webhook_secret="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    )
    assert enqueue(engine, plain, [intent(1), intent(2)]) == 2
    assert enqueue(engine, plain, [intent(1), intent(2)]) == 0
    assert enqueue(engine, plain, [intent(1), intent(1)]) == 0
    # The webhook rows are new keys; the email rows already exist.
    assert enqueue(engine, with_webhook, [intent(2), intent(3)]) == 3
    assert enqueue(engine, with_webhook, [intent(3)]) == 0
    assert enqueue(engine, plain, []) == 0
    with engine.connect() as connection:
        rows = connection.execute(
            sa.select(effects.c.idempotency_key, effects.c.channel, effects.c.state)
        ).all()
    assert sorted(rows) == sorted(
        [
            ("payment_failed_notice:in_ob:1", "email", "pending"),
            ("payment_failed_notice:in_ob:2", "email", "pending"),
            ("payment_failed_notice:in_ob:2:webhook", "webhook", "pending"),
            ("payment_failed_notice:in_ob:3", "email", "pending"),
            ("payment_failed_notice:in_ob:3:webhook", "webhook", "pending"),
        ]
    )
    assert effects_backlog(engine) == 5


def test_the_database_refuses_a_second_row_with_the_same_key(engine: Engine) -> None:
    values = {
        "idempotency_key": "payment_receipt:in_dup",
        "kind": "payment_receipt",
        "channel": "email",
        "payload": "{}",
        "max_attempts": 3,
        "run_at": 1.0,
        "created_at": 1.0,
    }
    with transaction(engine) as connection:
        connection.execute(sa.insert(effects).values(values))
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as connection:
        connection.execute(sa.insert(effects).values(values))


class Counting(SmtpHandler):
    def __init__(self, *, pipelining: bool = False) -> None:
        super().__init__(pipelining=pipelining)
        self.message_ids: list[str] = []
        self._lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        for line in envelope.content.splitlines():
            if line.lower().startswith(b"message-id:"):
                with self._lock:
                    self.message_ids.append(line.split(b":", 1)[1].strip().decode())
        return "250 OK"


@pytest.mark.parametrize("pipelining", [False, True], ids=["one_at_a_time", "pipelining"])
def test_concurrent_dispatchers_send_each_effect_exactly_once(
    engine: Engine, database_url: str, tmp_path: Path, pipelining: bool
) -> None:
    handler = Counting(pipelining=pipelining)
    with running_smtp(handler) as smtp_url:
        settings = Settings(database_url=database_url, smtp_url=smtp_url, data_dir=str(tmp_path))
        total = 60
        assert enqueue(engine, settings, [intent(n) for n in range(total)]) == total
        dispatchers = [EffectDispatcher(engine, settings, batch_size=7) for _ in range(3)]
        errors: list[BaseException] = []

        def drain(dispatcher: EffectDispatcher) -> None:
            try:
                while effects_backlog(engine):
                    dispatcher.run_once()
            except BaseException as exc:
                errors.append(exc)
            finally:
                dispatcher.close()

        threads = [threading.Thread(target=drain, args=(d,)) for d in dispatchers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors
    assert len(handler.message_ids) == total
    assert len(set(handler.message_ids)) == total
    history = effect_timeline(engine, "in_ob")
    assert len(history) == total
    assert all(h.state == "sent" and h.resends == 0 for h in history)
    assert all([a.outcome for a in h.history] == ["sent"] for h in history)


def test_redrive_refuses_what_is_not_dead(engine: Engine) -> None:
    settings = Settings()
    enqueue(engine, settings, [intent(1)])
    with engine.connect() as connection:
        effect_id = connection.execute(sa.select(effects.c.id)).scalar_one()
    with pytest.raises(InvalidRequest, match="not dead"):
        redrive_effect(engine, effect_id, 11.0)
    with pytest.raises(NotFound):
        redrive_effect(engine, effect_id + 1000, 11.0)


def test_pause_holds_effects_and_resume_releases_them(engine: Engine, tmp_path: Path) -> None:
    """`billhook pause` stops emails too: nothing is claimed until resume."""
    from billhook.ops.pause import set_paused

    settings = Settings(data_dir=str(tmp_path))  # no SMTP URL: the Maildir in tmp_path
    assert enqueue(engine, settings, [intent(1)]) == 1
    set_paused(engine, True, now=time.time())
    dispatcher = EffectDispatcher(engine, settings)
    try:
        assert dispatcher.run_once() == 0
        set_paused(engine, False, now=time.time())
        assert dispatcher.run_once() == 1
    finally:
        dispatcher.close()
    with engine.connect() as connection:
        assert connection.execute(sa.select(effects.c.state)).scalar_one() == "sent"
    assert len(list((tmp_path / "maildir" / "new").iterdir())) == 1
