"""Hand an email over: to an SMTP server (`smtp://`, `smtps://`) or, unset, into a Maildir folder.

`mailer_from_settings` picks `SmtpMailer` (in `smtp`) or `MaildirMailer`. A mailer's `send` raises
on failure; the dispatcher decides whether to retry.
"""

from __future__ import annotations

import mailbox
from pathlib import Path
from typing import Protocol

from billhook.config import Settings
from billhook.effects.render import OutgoingEmail
from billhook.effects.smtp import SmtpMailer


class Mailer(Protocol):
    def send(self, message: OutgoingEmail, *, sender: str, recipient: str) -> None: ...

    def close(self) -> None: ...

    @property
    def description(self) -> str: ...


class MaildirMailer:
    """Never drop mail: without SMTP, each message becomes a file in `<data>/maildir/new/`."""

    def __init__(self, path: Path) -> None:
        self._path = path

    @property
    def description(self) -> str:
        return f"maildir {self._path}"

    def send(self, message: OutgoingEmail, *, sender: str, recipient: str) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        folder = mailbox.Maildir(self._path, create=True)
        # Files in a Maildir have local line ends.
        folder.add(message.raw.replace(b"\r\n", b"\n"))

    def close(self) -> None:
        return None


def mailer_from_settings(settings: Settings) -> Mailer:
    if settings.smtp_url:
        return SmtpMailer(settings.smtp_url)
    return MaildirMailer(settings.data_path / "maildir")
