"""The email for an effect: stable Message-ID, Babel-formatted amounts, Jinja2 text + HTML parts.

Templates are `<kind>.subject.j2`, `<kind>.txt.j2` and `<kind>.html.j2`; a file of the same name
in `settings.templates_dir` overrides the packaged default. Rendering is pure given the row: a
resend after a crash produces the same bytes (same Message-ID, same Date, same boundary). The
result is the message as it goes on the wire (`OutgoingEmail.raw`), written directly for the
common ASCII case (see `_ascii_wire`) rather than flattened by the email package.
"""

from __future__ import annotations

import base64
import hashlib
import math
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from decimal import Decimal
from email.errors import HeaderParseError
from email.header import Header
from email.message import EmailMessage, Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import SMTP, SMTPUTF8, compat32
from email.utils import formatdate
from functools import lru_cache
from typing import Any

import jinja2
from babel import Locale
from babel.numbers import format_currency, get_currency_precision

from billhook.config import Settings
from billhook.errors import BillhookError

LOCALE = "en_US"
# Parsed once: `format_currency(locale="en_US")` would parse the identifier on every call.
_LOCALE = Locale.parse(LOCALE)


class EffectUnsendable(BillhookError):
    """The effect cannot be sent as it stands (no recipient, a broken template): dead at once."""


def message_id(idempotency_key: str, kind: str) -> str:
    """The same key always gives the same Message-ID, so a resend is recognisably the same mail."""
    return f"<{_digest(idempotency_key)}.{kind}@billhook>"


def _digest(idempotency_key: str) -> str:
    return hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]


# Amounts repeat (a plan's price, a standard fee), and Babel's pattern work is the largest part of
# rendering after the templates: the formatted string is kept per (amount, currency).
@lru_cache(maxsize=4096)
def format_amount(amount_minor: int | None, currency: str | None) -> str:
    """`1234, "usd"` -> `$12.34`; `1234, "jpy"` -> `¥1,234` (Babel knows each currency's digits)."""
    if amount_minor is None:
        return "-"
    if not currency:
        return f"{amount_minor} (minor units, currency unknown)"
    code = currency.upper()
    digits = get_currency_precision(code)
    return format_currency(Decimal(int(amount_minor)).scaleb(-digits), code, locale=_LOCALE)


# Effects created in the same second share their Date header (formatting one is a datetime, a
# timetuple and a zone name: more than the rest of the headers together).
@lru_cache(maxsize=256)
def _date(second: int) -> str:
    return formatdate(second, usegmt=True)


def invoice_label(invoice_id: str, number: str | None) -> str:
    return f"{number} ({invoice_id})" if number else invoice_id


@dataclass(frozen=True)
class OutgoingEmail:
    """An email as it goes on the wire: `raw` has CRLF line ends and is not dot-stuffed."""

    raw: bytes
    message_id: str
    # A non-ASCII address needs SMTPUTF8 (and `raw` is then flattened with utf8 headers).
    international: bool = False


def render_email(
    *,
    kind: str,
    idempotency_key: str,
    payload: Mapping[str, Any],
    recipient: str | None,
    created_at: float,
    settings: Settings,
) -> OutgoingEmail:
    invoice_id = str(payload.get("invoice_id") or "")
    if not recipient:
        raise EffectUnsendable(
            f"invoice {invoice_id or '?'} has no customer_email; set it and redrive "
            f"(`billhook dlq redrive`)"
        )
    context = {
        **payload,
        "kind": kind,
        "invoice_id": invoice_id,
        "number": payload.get("number"),
        "invoice_label": invoice_label(invoice_id, payload.get("number")),
        "amount_display": format_amount(payload.get("amount"), payload.get("currency")),
        "currency_code": str(payload.get("currency") or "").upper(),
        "customer_email": recipient,
        "idempotency_key": idempotency_key,
    }
    templates = settings.templates_dir
    subject = " ".join(_render(templates, f"{kind}.subject.j2", context).split())
    text = _render(templates, f"{kind}.txt.j2", context)
    html = _render(templates, f"{kind}.html.j2", context)

    digest = _digest(idempotency_key)
    headers = {
        "From": settings.mail_from,
        "To": recipient,
        "Date": _date(math.floor(created_at)),
        "Message-ID": f"<{digest}.{kind}@billhook>",
        "X-Billhook-Idempotency-Key": idempotency_key,
    }
    try:
        if all(value.isascii() for value in headers.values()):
            raw = _ascii_wire(subject, headers, text, html, boundary=f"billhook-{digest}")
            return OutgoingEmail(raw=raw, message_id=headers["Message-ID"])
        # Internationalized addresses need SMTPUTF8, which `EmailMessage` (policy.default)
        # handles: the slow path, kept for the rare mailbox that needs it.
        message = _international_message(subject, headers, text, html)
        international = not (settings.mail_from.isascii() and recipient.isascii())
        return OutgoingEmail(
            raw=message.as_bytes(policy=SMTPUTF8 if international else SMTP),
            message_id=headers["Message-ID"],
            international=international,
        )
    except (HeaderParseError, ValueError) as exc:
        # E.g. a line break in the address: refused, never folded into an injected header.
        raise EffectUnsendable(
            f"the email for {idempotency_key} cannot be written ({exc}); fix the address or "
            f"template and redrive"
        ) from exc


def compat32_message(
    subject: str, headers: Mapping[str, str], text: str, html: str, *, boundary: str
) -> Message:
    """The message `_ascii_wire` writes, built with the email package (the reference for tests).

    The standard message: multipart/alternative, text then HTML, UTF-8 base64 parts.
    """
    message = MIMEMultipart("alternative", boundary=boundary)
    message["Subject"] = _subject_value(subject)
    for name, value in headers.items():
        message[name] = value
    message.attach(MIMEText(text, "plain", "utf-8"))
    message.attach(MIMEText(html, "html", "utf-8"))
    return message


def _ascii_wire(
    subject: str, headers: Mapping[str, str], text: str, html: str, *, boundary: str
) -> bytes:
    """The bytes `compat32_message(...).as_bytes()` gives with CRLF, written directly.

    The email package costs about 0.5 ms a message (a `Header` fold per header line, charset
    bookkeeping per part), more than the whole rest of a hand-over. The structure never varies,
    so it is written here; any header line that would need folding (long, non-ASCII, control
    characters) still goes through compat32's own folding, so the bytes are the same. The
    boundary comes from the key, so a resend is byte-for-byte the same message; both parts are
    base64 (no "-"), so no body line can start with the boundary.
    """
    out = [
        b'Content-Type: multipart/alternative;\r\n boundary="',
        boundary.encode("ascii"),
        b'"\r\nMIME-Version: 1.0\r\n',
        _header_line("Subject", _subject_value(subject)),
    ]
    out += [_header_line(name, value) for name, value in headers.items()]
    separator = b"\r\n--" + boundary.encode("ascii") + b"\r\n"
    out += [
        b"\r\n" + separator[2:],
        _TEXT_PART_HEADERS,
        _base64_lines(text),
        separator,
        _HTML_PART_HEADERS,
        _base64_lines(html),
        b"\r\n--",
        boundary.encode("ascii"),
        b"--\r\n",
    ]
    return b"".join(out)


def _subject_value(subject: str) -> str:
    return subject if subject.isascii() else Header(subject, "utf-8").encode()


def _header_line(name: str, value: str) -> bytes:
    # compat32 leaves a printable ASCII line that fits in 78 characters as it is.
    if value.isascii() and value.isprintable():
        if len(name) + len(value) + 2 <= _MAX_LINE:
            return f"{name}: {value}\r\n".encode("ascii")
        folded = _fold_words(name, value)
        if folded is not None:
            return folded
    return _WIRE_POLICY.fold_binary(name, value)


def _fold_words(name: str, value: str) -> bytes | None:
    """compat32's fold of a long printable ASCII value of single-space-separated words, or None
    when the value is not that simple (compat32 then folds it: about 25 us a subject).

    For such a value compat32 (`Header.encode`, splitchars ";, \t") breaks greedily before the
    word that would take the line past 78 characters, the space starting the continuation line;
    a ";" or "," would move the break, and a first word too long for the first line puts it on a
    line of its own: those go to compat32.
    """
    if ";" in value or "," in value:
        return None
    words = value.split(" ")
    if "" in words or len(name) + 2 + len(words[0]) > _MAX_LINE:
        return None
    lines = []
    line = f"{name}: {words[0]}"
    for word in words[1:]:
        if len(line) + 1 + len(word) > _MAX_LINE:
            lines.append(line)
            line = " " + word
        else:
            line += " " + word
    lines.append(line)
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def _base64_lines(body: str) -> bytes:
    # 57 bytes to a 76-character line, as `email.base64mime.body_encode` does.
    return base64.encodebytes(body.encode("utf-8")).replace(b"\n", b"\r\n")


_MAX_LINE = 78
_WIRE_POLICY = compat32.clone(linesep="\r\n")
_TEXT_PART_HEADERS = (
    b'Content-Type: text/plain; charset="utf-8"\r\nMIME-Version: 1.0\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\n"
)
_HTML_PART_HEADERS = _TEXT_PART_HEADERS.replace(b"text/plain", b"text/html")


def _international_message(
    subject: str, headers: Mapping[str, str], text: str, html: str
) -> EmailMessage:
    message = EmailMessage()
    message["Subject"] = subject
    for name, value in headers.items():
        message[name] = value
    message.set_content(text)
    message.add_alternative(html, subtype="html")
    return message


def _render(templates_dir: str, name: str, context: Mapping[str, Any]) -> str:
    try:
        return _template(templates_dir, name).render(context)
    except jinja2.TemplateNotFound as exc:
        raise EffectUnsendable(
            f"no email template {name!r} for this effect kind; add it to the templates directory "
            f"(BILLHOOK_TEMPLATES_DIR) and redrive"
        ) from exc
    except jinja2.TemplateError as exc:
        raise EffectUnsendable(
            f"email template {name!r} failed: {exc}; fix it and redrive"
        ) from exc


# Seconds a compiled template is used before its source is looked at again. Jinja's own check
# (`get_template` with auto_reload) stats the file and takes a lock on every lookup, three times a
# message, which cost more than rendering the templates. An edited template is still picked up
# without a restart, within this long: "fix the template and redrive" keeps working.
TEMPLATE_RECHECK_SECONDS = 1.0
_templates: dict[tuple[str, str], tuple[jinja2.Template, float]] = {}


def _template(templates_dir: str, name: str) -> jinja2.Template:
    now = time.monotonic()
    cached = _templates.get((templates_dir, name))
    if cached is not None and now - cached[1] < TEMPLATE_RECHECK_SECONDS:
        return cached[0]
    # A missing template raises here and is not kept: adding it works at once.
    template = _environment(templates_dir).get_template(name)
    _templates[(templates_dir, name)] = (template, now)
    return template


class _Environment(jinja2.Environment):
    def make_globals(self, d: MutableMapping[str, Any] | None) -> MutableMapping[str, Any]:
        # Jinja gives each template a ChainMap over the environment's globals, which every render
        # copies into a dict and a set in Python (a third of a small template's render). Nothing
        # here changes globals after loading, so a plain dict snapshot renders the same.
        return {**self.globals, **(d or {})}


@lru_cache(maxsize=8)
def _environment(templates_dir: str) -> jinja2.Environment:
    loaders: list[jinja2.BaseLoader] = []
    if templates_dir:
        loaders.append(jinja2.FileSystemLoader(templates_dir))
    loaders.append(jinja2.PackageLoader("billhook.effects", "templates"))
    return _Environment(
        loader=jinja2.ChoiceLoader(loaders),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default=False),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
