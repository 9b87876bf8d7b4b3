"""Hand an email over: to an SMTP server (`smtp://`, `smtps://`) or, unset, into a Maildir folder.

A mailer raises on failure; the dispatcher decides whether to retry. One SMTP connection is
reused across a batch; after a quiet spell it is checked with NOOP before reuse, so a server that
closed an idle connection costs a reconnect, not a failed attempt.
"""

from __future__ import annotations

import mailbox
import smtplib
import ssl
import time
from email.message import Message
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from billhook.config import Settings
from billhook.errors import ConfigError

SMTP_TIMEOUT_SECONDS = 10.0
_IDLE_CHECK_SECONDS = 5.0


class Mailer(Protocol):
    def send(self, message: Message, *, sender: str, recipient: str) -> None: ...

    def close(self) -> None: ...

    @property
    def description(self) -> str: ...


class SmtpMailer:
    def __init__(self, url: str, *, timeout: float = SMTP_TIMEOUT_SECONDS) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ConfigError(
                f"BILLHOOK_SMTP_URL={parts.scheme}://{parts.hostname or ''}...: expected "
                "smtp://[user:password@]host[:port] or smtps://..."
            )
        self._tls = parts.scheme == "smtps"
        self._host = parts.hostname
        self._port = parts.port or (465 if self._tls else 25)
        self._username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        self._timeout = timeout
        self._client: smtplib.SMTP | None = None
        self._last_used = 0.0

    @property
    def description(self) -> str:
        return f"{'smtps' if self._tls else 'smtp'}://{self._host}:{self._port}"

    def send(self, message: Message, *, sender: str, recipient: str) -> None:
        client = self._connection()
        try:
            client.send_message(message, from_addr=sender, to_addrs=[recipient])
        except BaseException:
            self.close()
            raise
        self._last_used = time.monotonic()

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            client.quit()
        except (smtplib.SMTPException, OSError):
            client.close()

    def _connection(self) -> smtplib.SMTP:
        if self._client is not None and time.monotonic() - self._last_used > _IDLE_CHECK_SECONDS:
            try:
                self._client.noop()
            except (smtplib.SMTPException, OSError):
                self._client.close()
                self._client = None
        if self._client is None:
            self._client = self._connect()
        return self._client

    def _connect(self) -> smtplib.SMTP:
        client: smtplib.SMTP
        if self._tls:
            client = smtplib.SMTP_SSL(
                self._host, self._port, timeout=self._timeout, context=ssl.create_default_context()
            )
        else:
            client = smtplib.SMTP(self._host, self._port, timeout=self._timeout)
        try:
            if self._username is not None:
                client.login(self._username, self._password or "")
        except BaseException:
            client.close()
            raise
        return client


class MaildirMailer:
    """Never drop mail: without SMTP, each message becomes a file in `<data>/maildir/new/`."""

    def __init__(self, path: Path) -> None:
        self._path = path

    @property
    def description(self) -> str:
        return f"maildir {self._path}"

    def send(self, message: Message, *, sender: str, recipient: str) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        folder = mailbox.Maildir(self._path, create=True)
        folder.add(message)

    def close(self) -> None:
        return None


def mailer_from_settings(settings: Settings) -> Mailer:
    if settings.smtp_url:
        return SmtpMailer(settings.smtp_url)
    return MaildirMailer(settings.data_path / "maildir")
