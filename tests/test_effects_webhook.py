"""The downstream webhook channel against a real HTTP server (uvicorn on 127.0.0.1)."""

from __future__ import annotations

import base64
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
import uvicorn
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from billhook.config import Settings
from billhook.effects import EffectDispatcher, enqueue_effects
from billhook.errors import ConfigError
from billhook.store.engine import create_engine, transaction
from billhook.store.schema import effects
from smtp_servers import SmtpHandler, running_smtp


class Downstream:
    """Records each POST; answers with the queued statuses first, then 200."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.statuses: list[int] = []

    async def endpoint(self, request: Request) -> Response:
        self.requests.append((dict(request.headers), await request.body()))
        return Response(status_code=self.statuses.pop(0) if self.statuses else 200)


@pytest.fixture
def downstream() -> Iterator[tuple[Downstream, str]]:
    recorder = Downstream()
    app = Starlette(routes=[Route("/hook", recorder.endpoint, methods=["POST"])])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield recorder, f"http://127.0.0.1:{port}/hook"
    server.should_exit = True
    thread.join(timeout=10)


class Intent:
    kind = "refund_notice"
    idempotency_key = "refund_notice:in_wh:re_1"
    payload: dict[str, Any] = {
        "invoice_id": "in_wh",
        "number": None,
        "currency": "eur",
        "customer_email": None,
        "amount": 250,
        "refund_id": "re_1",
    }


def test_webhook_is_signed_keyed_and_retried_until_2xx(
    sqlite_url: str, tmp_path: Path, downstream: tuple[Downstream, str]
) -> None:
    recorder, url = downstream
    recorder.statuses = [503]
    secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    settings = Settings(
        database_url=sqlite_url,
        data_dir=str(tmp_path),
        effect_webhook_url=url,
        effect_webhook_secret=secret,
        retry_base_seconds=0.001,
        retry_max_seconds=0.002,
    )
    engine = create_engine(sqlite_url)
    with transaction(engine) as connection:
        inserted = enqueue_effects(
            connection,
            [Intent()],
            invoice_id="in_wh",
            event_pk=None,
            now=time.time(),
            settings=settings,
        )
    assert inserted == 2  # the email (no address: dead) and the webhook

    dispatcher = EffectDispatcher(engine, settings)
    key = Intent.idempotency_key + ":webhook"
    deadline = time.monotonic() + 20
    while True:
        dispatcher.run_once()
        with engine.connect() as connection:
            state = connection.execute(
                sa.select(effects.c.state).where(effects.c.idempotency_key == key)
            ).scalar_one()
        if state == "sent":
            break
        assert time.monotonic() < deadline, f"webhook effect stuck in {state}"
    dispatcher.close()

    assert len(recorder.requests) == 2  # the 503, then the retry that succeeded
    for headers, body in recorder.requests:
        assert headers["idempotency-key"] == key
        assert headers["webhook-id"] == key
        assert headers["content-type"] == "application/json"
        verified = Webhook(secret).verify(body, headers)
        assert verified == {
            "kind": "refund_notice",
            "idempotency_key": key,
            "payload": Intent.payload,
        }
    assert orjson.loads(recorder.requests[0][1]) == orjson.loads(recorder.requests[1][1])
    with pytest.raises(Exception, match="signature"):
        Webhook("whsec_" + base64.b64encode(b"another secret!!").decode()).verify(
            recorder.requests[0][1], recorder.requests[0][0]
        )
    engine.dispose()


def test_webhook_url_without_a_secret_is_a_start_up_error(sqlite_url: str) -> None:
    settings = Settings(database_url=sqlite_url, effect_webhook_url="http://127.0.0.1:9/hook")
    engine = create_engine(sqlite_url)
    with pytest.raises(ConfigError, match="BILLHOOK_EFFECT_WEBHOOK_SECRET"):
        EffectDispatcher(engine, settings)
    engine.dispose()


class PipelinedInbox(SmtpHandler):
    """An SMTP server offering PIPELINING that notes, at each email's content, how many webhook
    requests `downstream` had received by then."""

    def __init__(self, downstream: Downstream) -> None:
        super().__init__(pipelining=True)
        self.downstream = downstream
        self.webhooks_before: list[int] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.webhooks_before.append(len(self.downstream.requests))
        return "250 OK"


def test_an_email_waiting_for_its_verdict_gets_it_before_a_webhook_goes(
    sqlite_url: str, tmp_path: Path, downstream: tuple[Downstream, str]
) -> None:
    """A batch of email, webhook, email, webhook: each email, pipelined, would wait for the next
    email's envelope; a webhook in between settles it first, so its content is not held back
    while the webhook goes."""
    recorder, url = downstream
    inbox = PipelinedInbox(recorder)
    engine = create_engine(sqlite_url)
    with running_smtp(inbox) as smtp_url:
        settings = Settings(
            database_url=sqlite_url,
            data_dir=str(tmp_path),
            smtp_url=smtp_url,
            effect_webhook_url=url,
            effect_webhook_secret="whsec_" + base64.b64encode(os.urandom(24)).decode(),
        )
        intents = []
        for n in (1, 2):
            intent = Intent()
            intent.idempotency_key = f"refund_notice:in_wh:re_{n}"
            intent.payload = {**Intent.payload, "customer_email": "jane@example.com"}
            intents.append(intent)
        with transaction(engine) as connection:
            inserted = enqueue_effects(
                connection,
                intents,
                invoice_id="in_wh",
                event_pk=None,
                now=time.time(),
                settings=settings,
            )
        assert inserted == 4
        with transaction(engine) as connection:
            # Claimed in the order of their ids: email, webhook, email, webhook.
            connection.execute(sa.update(effects).values(run_at=effects.c.run_at + effects.c.id))
        dispatcher = EffectDispatcher(engine, settings, clock=lambda: time.time() + 10)
        assert dispatcher.run_once() == 4
        dispatcher.close()
    with engine.connect() as connection:
        rows = connection.execute(
            sa.select(effects.c.channel, effects.c.state).order_by(effects.c.id)
        ).all()
    assert [tuple(row) for row in rows] == [
        ("email", "sent"),
        ("webhook", "sent"),
        ("email", "sent"),
        ("webhook", "sent"),
    ]
    assert inbox.webhooks_before == [0, 1]
    assert len(recorder.requests) == 2
    engine.dispose()
