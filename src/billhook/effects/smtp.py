"""Hand an email over to an SMTP server (`smtp://`, `smtps://`): `SmtpMailer`.

`send` raises on failure; the dispatcher decides whether to retry. One SMTP connection
carries message after message (MAIL / RCPT / DATA each, no connect, EHLO or QUIT in between) and
stays open between batches: a connection idle for longer than `_IDLE_CLOSE_SECONDS` is closed and
a new one opened, and a reused connection the server has dropped is replaced once, at MAIL, before
anything of the message was sent (so that retry can never deliver it twice). A refusal (a 4xx/5xx
answer) fails that message only: the transaction is reset and the connection kept for the next.

When the server offers PIPELINING (RFC 2920), MAIL, RCPT and DATA go in one write and their
three replies are read together. The content is only sent after DATA's 354, so a refusal of any
of them still sends nothing of it. A batch goes through `hand` and `settle` instead of `send`: a
message whose DATA was answered 354 waits, and its content, with its terminating CRLF . CRLF,
goes in the same write as the next message's MAIL, RCPT and DATA (RFC 2920 lets the content open
a group); its final reply is read with the next envelope's replies: one round trip a message.
Each message still has its own verdict (`Verdict`): sent only on its own final 250. A connection
lost after a message's content was sent and before its final reply fails that message (it may or
may not have been delivered: it is retried under the same Message-ID); the message pipelined
behind it sent nothing past its envelope, so it starts again on a new connection.
"""

from __future__ import annotations

import re
import smtplib
import ssl
import time
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

from billhook.effects.render import OutgoingEmail
from billhook.errors import ConfigError

SMTP_TIMEOUT_SECONDS = 10.0
# Below the 5 minutes RFC 5321 asks servers to wait: an idle connection is ours to close first.
_IDLE_CLOSE_SECONDS = 60.0


class Verdict(NamedTuple):
    """What became of a message handed over: `error` is None once the server accepted it."""

    message: OutgoingEmail
    error: Exception | None


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
        # A message whose DATA was answered 354 (pipelined): its content goes with the next
        # message's envelope, or alone in `settle`.
        self._awaiting: OutgoingEmail | None = None

    @property
    def description(self) -> str:
        return f"{'smtps' if self._tls else 'smtp'}://{self._host}:{self._port}"

    def send(self, message: OutgoingEmail, *, sender: str, recipient: str) -> None:
        """Hand one message over and wait for the server's verdict on it; raises if refused."""
        if self._awaiting is not None:
            raise RuntimeError("a message handed over awaits its verdict: settle() it first")
        for verdict in self.hand(message, sender=sender, recipient=recipient) + self.settle():
            if verdict.error is not None:
                raise verdict.error

    def hand(self, message: OutgoingEmail, *, sender: str, recipient: str) -> list[Verdict]:
        """Hand `message` over; returns the verdicts learnt on the way, never raises for SMTP.

        Pipelined, the message waits after DATA's 354 and its verdict comes with the next `hand`
        or `settle`; the verdict of the message that waited before it comes now. A refused
        envelope, or a message that cannot be pipelined (SMTPUTF8, a server without PIPELINING),
        has its own verdict at once.
        """
        verdicts: list[Verdict] = []
        if self._awaiting is not None:
            if not message.international:
                verdicts, started = self._behind(message, sender, recipient)
                if started:
                    return verdicts
                # The connection was lost before the envelope was answered: a new one carries it.
            else:
                verdicts = self.settle()
        return verdicts + self._start(message, sender, recipient)

    def settle(self) -> list[Verdict]:
        """The verdict of the message that waits for its content to be sent, if one does."""
        message, self._awaiting = self._awaiting, None
        if message is None:
            return []
        assert self._client is not None
        try:
            self._finish(self._client, message)
        except Exception as exc:
            return [Verdict(message, exc)]
        return [Verdict(message, None)]

    def close(self) -> None:
        # A message that waits is dropped with the connection, nothing of its content sent.
        self._close(quit=self._awaiting is None)

    def _start(self, message: OutgoingEmail, sender: str, recipient: str) -> list[Verdict]:
        """MAIL, RCPT, DATA on a connection where no message waits; pipelined, the message then
        waits for its content to be sent, otherwise it is sent and its verdict returned."""
        options = ["SMTPUTF8", "BODY=8BITMIME"] if message.international else []
        try:
            client, pipelined = self._envelope(sender, recipient, options, len(message.raw))
            if pipelined:
                self._awaiting = message
                return []
            self._finish(client, message)
        except Exception as exc:
            return [Verdict(message, exc)]
        return [Verdict(message, None)]

    def _behind(
        self, message: OutgoingEmail, sender: str, recipient: str
    ) -> tuple[list[Verdict], bool]:
        """The waiting message's content and `message`'s MAIL, RCPT and DATA in one write, then
        the former's final reply and the latter's three. Returns the verdicts and whether
        `message` was started (it waits, or has its verdict); if not, the connection was lost
        before its envelope was answered."""
        waiting, client = self._awaiting, self._client
        assert waiting is not None and client is not None
        try:
            envelope = _envelope_commands(client, sender, recipient, len(message.raw))
        except ValueError as exc:
            # An address that cannot go in a command fails its message; the waiting one goes alone.
            return [*self.settle(), Verdict(message, exc)], True
        self._awaiting = None
        try:
            client.send(_content(waiting.raw) + envelope)
            code, reply = client.getreply()
        except Exception as exc:
            # The content went, its verdict did not come: as for a message sent alone, it fails
            # (it may be delivered; it is retried under the same Message-ID).
            self.close()
            return [Verdict(waiting, exc)], False
        except BaseException:
            self.close()
            raise
        verdicts = [Verdict(waiting, None if code == 250 else smtplib.SMTPDataError(code, reply))]
        if code == 250:
            self._last_used = time.monotonic()
        # The final reply ended the waiting message's transaction, refused or not: the envelope
        # behind it is read as it came, and needs no RSET.
        try:
            replies = [client.getreply(), client.getreply(), client.getreply()]
        except Exception:
            # Lost before the envelope was answered: nothing past it was sent, so it may start
            # again on a new connection.
            self.close()
            return verdicts, False
        except BaseException:
            self.close()
            raise
        refusal = _refusal(replies, sender, recipient)
        if refusal is not None:
            self._after_refusal(client, replies)
            return [*verdicts, Verdict(message, refusal)], True
        self._awaiting = message
        return verdicts, True

    def _finish(self, client: smtplib.SMTP, message: OutgoingEmail) -> None:
        """DATA was answered 354: the content, then the server's verdict on the message."""
        try:
            client.send(_content(message.raw))
            code, reply = client.getreply()
        except BaseException:
            # A dropped connection, a timeout mid-content: the session's state is unknown, so it
            # is not reused.
            self.close()
            raise
        if code != 250:
            # The server refused the message: it fails, the connection is fine.
            self._reset(client)
            raise smtplib.SMTPDataError(code, reply)
        self._last_used = time.monotonic()

    def _envelope(
        self, sender: str, recipient: str, options: list[str], size: int
    ) -> tuple[smtplib.SMTP, bool]:
        """A connection on which MAIL, RCPT and DATA were accepted (DATA answered 354), and
        whether they were pipelined."""
        if self._client is not None and time.monotonic() - self._last_used > _IDLE_CLOSE_SECONDS:
            self.close()
        reused = self._client is not None
        client = self._client if self._client is not None else self._open()
        try:
            pipelined, mail = self._mail(client, sender, recipient, options, size)
        except (smtplib.SMTPServerDisconnected, OSError):
            self.close()
            if not reused:
                raise
            # The server dropped a connection we kept: no reply came, so nothing of this
            # message was accepted, and its content was not sent.
            client = self._open()
            try:
                pipelined, mail = self._mail(client, sender, recipient, options, size)
            except BaseException:
                self.close()
                raise
        except BaseException:
            self.close()
            raise
        try:
            replies = [mail]
            if pipelined:
                # RCPT's and DATA's replies are read whatever MAIL got, to stay in step.
                replies += [client.getreply(), client.getreply()]
            elif mail[0] == 250:
                client.putcmd("rcpt", f"TO:{_quoted(recipient)}")
                replies.append(client.getreply())
                if replies[-1][0] in (250, 251):
                    client.putcmd("data")
                    replies.append(client.getreply())
        except BaseException:
            self.close()
            raise
        refusal = _refusal(replies, sender, recipient)
        if refusal is None:
            return client, pipelined
        self._after_refusal(client, replies)
        raise refusal

    def _mail(
        self, client: smtplib.SMTP, sender: str, recipient: str, options: list[str], size: int
    ) -> tuple[bool, tuple[int, bytes]]:
        """Send MAIL (and, when the server offers PIPELINING, RCPT and DATA with it: one round
        trip instead of three, RFC 2920); returns whether it was pipelined and MAIL's reply."""
        client.ehlo_or_helo_if_needed()
        if options:
            # SMTPUTF8: smtplib's own MAIL checks the extension and switches the encoding.
            return False, client.mail(sender, options)
        if not client.has_extn("pipelining"):
            client.putcmd("mail", f"FROM:{_quoted(sender)}{_size_option(client, size)}")
            return False, client.getreply()
        client.send(_envelope_commands(client, sender, recipient, size))
        return True, client.getreply()

    def _after_refusal(self, client: smtplib.SMTP, replies: list[tuple[int, bytes]]) -> None:
        if len(replies) == 3 and replies[2][0] == 354:
            # DATA accepted after a refused MAIL or RCPT (RFC 2920 forbids it): the server waits
            # for content we will not send, so this session is not reused.
            self._close(quit=False)
        else:
            # A refusal fails this message only: RSET keeps the connection for the next.
            self._reset(client)

    def _close(self, *, quit: bool = True) -> None:
        """Close the connection: with QUIT, unless the server reads content (DATA was answered
        354), where QUIT would be taken as content; it discards an unfinished message."""
        self._awaiting = None
        client, self._client = self._client, None
        if client is None:
            return
        if quit:
            try:
                client.quit()
                return
            except (smtplib.SMTPException, OSError):
                pass
        client.close()

    def _reset(self, client: smtplib.SMTP) -> None:
        """After a refusal: RSET keeps the connection for the next message, else drop it."""
        try:
            client.rset()
        except (smtplib.SMTPException, OSError):
            self.close()

    def _open(self) -> smtplib.SMTP:
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


def _envelope_commands(client: smtplib.SMTP, sender: str, recipient: str, size: int) -> bytes:
    """MAIL, RCPT and DATA as one pipelined group; ValueError if an address cannot be sent so."""
    mail_from, rcpt_to = _quoted(sender), _quoted(recipient)
    if any(c in mail_from + rcpt_to for c in "\r\n"):
        # As smtplib's putcmd refuses: a line break in an address must not end a command.
        raise ValueError("an address contains a line break")
    size_option = _size_option(client, size)
    # ASCII, as smtplib sends commands (UnicodeEncodeError is a ValueError).
    return f"MAIL FROM:{mail_from}{size_option}\r\nRCPT TO:{rcpt_to}\r\nDATA\r\n".encode("ascii")


def _size_option(client: smtplib.SMTP, size: int) -> str:
    return f" SIZE={size}" if client.does_esmtp and client.has_extn("size") else ""


def _refusal(
    replies: list[tuple[int, bytes]], sender: str, recipient: str
) -> smtplib.SMTPException | None:
    """The error for the first of MAIL, RCPT, DATA the server refused, else None."""
    (mail_code, mail_reply), rest = replies[0], replies[1:]
    if mail_code != 250:
        return smtplib.SMTPSenderRefused(mail_code, mail_reply, sender)
    if rest and rest[0][0] not in (250, 251):
        return smtplib.SMTPRecipientsRefused({recipient: rest[0]})
    if len(rest) == 2 and rest[1][0] != 354:
        return smtplib.SMTPDataError(*rest[1])
    return None


def _content(raw: bytes) -> bytes:
    """The message after DATA: dot-stuffed, ended by CRLF . CRLF (as `smtplib.SMTP.data`)."""
    # The search is cheap; the substitution walks the message in Python-level regex steps.
    stuffed = _LEADING_DOT.sub(b"..", raw) if raw[:1] == b"." or b"\n." in raw else raw
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


_LEADING_DOT = re.compile(rb"(?m)^\.")


def _quoted(address: str) -> str:
    """`<address>` for MAIL / RCPT, as `smtplib.quoteaddr` gives it.

    `quoteaddr` runs the address parser (about 8 us, twice a message); a plain addr-spec needs
    none of it, so only other forms (a display name, quoting, non-ASCII) go through it.
    """
    if _PLAIN_ADDRESS.fullmatch(address):
        return f"<{address}>"
    return smtplib.quoteaddr(address)


# Dot-atom local part @ a domain of letters, digits, dots and hyphens: parsed as itself.
_PLAIN_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?"
)
