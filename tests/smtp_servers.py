"""Real SMTP servers for tests: aiosmtpd on 127.0.0.1, on a free port, stopped on exit.

A test's handler derives from `SmtpHandler`, whose EHLO answer offers PIPELINING (RFC 2920) when
asked: aiosmtpd reads pipelined commands but does not advertise the extension itself. The handler
adds the `handle_*` hooks its test needs:

    from smtp_servers import SmtpHandler, running_smtp

    class Inbox(SmtpHandler):
        async def handle_DATA(self, server, session, envelope) -> str: ...

    with running_smtp(Inbox(pipelining=True)) as smtp_url: ...
"""

from __future__ import annotations

import email
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import EmailMessage
from email.policy import default as default_policy
from typing import Any

from aiosmtpd.controller import Controller

from live_server import free_port


class SmtpHandler:
    def __init__(self, *, pipelining: bool = False) -> None:
        self.pipelining = pipelining

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if not self.pipelining:
            return responses
        return [*responses[:-1], "250-PIPELINING", responses[-1]]


@contextmanager
def running_smtp(handler: Any, *, port: int | None = None, **options: Any) -> Iterator[str]:
    """Serve `handler` on `port` (a free one if None); yield the server's `smtp://` URL.

    `options` go to aiosmtpd's `Controller`: `timeout`, `enable_SMTPUTF8`, `authenticator`...
    """
    controller = Controller(
        handler, hostname="127.0.0.1", port=port if port is not None else free_port(), **options
    )
    controller.start()
    try:
        yield f"smtp://127.0.0.1:{controller.port}"
    finally:
        controller.stop()


def received_message(envelope: Any) -> EmailMessage:
    """The content of the message in `envelope`, parsed."""
    parsed = email.message_from_bytes(envelope.content, policy=default_policy)
    assert isinstance(parsed, EmailMessage)
    return parsed


def sent_behind(server: Any) -> bytes:
    """What the client has already sent that the server has not read yet: behind a pipelined
    command, the commands (or content) that came in the same write. Only aiosmtpd's private
    stream buffer shows it."""
    return bytes(server._reader._buffer)
