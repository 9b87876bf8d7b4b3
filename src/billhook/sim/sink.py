"""A real SMTP server (aiosmtpd) that records every message, and can refuse mail for a while."""

from __future__ import annotations

import email
import email.policy
import threading
import time
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller

from billhook.sim.checker import ObservedEmail
from billhook.sim.classify import classify_email


@dataclass(frozen=True)
class SinkMessage:
    message_id: str | None
    subject: str
    headers: dict[str, str]
    body: str
    recipients: tuple[str, ...]
    received_at: float

    def observed(self) -> ObservedEmail:
        effect = classify_email(self.headers, self.subject, self.body)
        return ObservedEmail(
            message_id=self.message_id,
            kind=effect.kind if effect else None,
            invoice_id=effect.invoice_id if effect else None,
            ref=effect.ref if effect else "",
            subject=self.subject,
            received_at=self.received_at,
        )


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self._sink = sink

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self._sink.refusing:
            self._sink.refused += 1
            return "451 4.3.0 simulated outage, try again later"
        self._sink.record(bytes(envelope.content), tuple(envelope.rcpt_tos))
        return "250 2.0.0 OK"


class SmtpSink:
    """Start with `start()`, read `messages`, toggle `refusing` to simulate an outage."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port or _free_port(host)
        self.refusing = False
        self.refused = 0
        self._messages: list[SinkMessage] = []
        self._lock = threading.Lock()
        self._controller = Controller(_Handler(self), hostname=host, port=self.port)

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    def start(self) -> SmtpSink:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def record(self, raw: bytes, recipients: tuple[str, ...]) -> None:
        message = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        body_part = message.get_body(preferencelist=("plain", "html"))
        body = body_part.get_content() if body_part is not None else ""
        with self._lock:
            self._messages.append(
                SinkMessage(
                    message_id=(str(message["Message-ID"]).strip() or None)
                    if message["Message-ID"]
                    else None,
                    subject=str(message["Subject"] or ""),
                    headers={k: str(v) for k, v in message.items()},
                    body=str(body),
                    recipients=recipients,
                    received_at=time.time(),
                )
            )

    @property
    def messages(self) -> list[SinkMessage]:
        with self._lock:
            return list(self._messages)

    def observed(self) -> list[ObservedEmail]:
        return [m.observed() for m in self.messages]


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
