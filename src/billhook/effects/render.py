"""The email for an effect: stable Message-ID, Babel-formatted amounts, Jinja2 text + HTML parts.

Templates are `<kind>.subject.j2`, `<kind>.txt.j2` and `<kind>.html.j2`; a file of the same name
in `settings.templates_dir` overrides the packaged default. Rendering is pure given the row: a
resend after a crash produces the same message (same Message-ID, same Date).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from decimal import Decimal
from email.header import Header
from email.message import EmailMessage, Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formatdate
from functools import lru_cache
from typing import Any

import jinja2
from babel.numbers import format_currency, get_currency_precision

from billhook.config import Settings
from billhook.errors import BillhookError

LOCALE = "en_US"


class EffectUnsendable(BillhookError):
    """The effect cannot be sent as it stands (no recipient, a broken template): dead at once."""


def message_id(idempotency_key: str, kind: str) -> str:
    """The same key always gives the same Message-ID, so a resend is recognisably the same mail."""
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]
    return f"<{digest}.{kind}@billhook>"


def format_amount(amount_minor: int | None, currency: str | None) -> str:
    """`1234, "usd"` -> `$12.34`; `1234, "jpy"` -> `¥1,234` (Babel knows each currency's digits)."""
    if amount_minor is None:
        return "-"
    if not currency:
        return f"{amount_minor} (minor units, currency unknown)"
    code = currency.upper()
    digits = get_currency_precision(code)
    return format_currency(Decimal(int(amount_minor)).scaleb(-digits), code, locale=LOCALE)


def invoice_label(invoice_id: str, number: str | None) -> str:
    return f"{number} ({invoice_id})" if number else invoice_id


def render_email(
    *,
    kind: str,
    idempotency_key: str,
    payload: Mapping[str, Any],
    recipient: str | None,
    created_at: float,
    settings: Settings,
) -> Message:
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
    environment = _environment(settings.templates_dir)
    subject = " ".join(_render(environment, f"{kind}.subject.j2", context).split())
    text = _render(environment, f"{kind}.txt.j2", context)
    html = _render(environment, f"{kind}.html.j2", context)

    headers = {
        "From": settings.mail_from,
        "To": recipient,
        "Date": formatdate(created_at, usegmt=True),
        "Message-ID": message_id(idempotency_key, kind),
        "X-Billhook-Idempotency-Key": idempotency_key,
    }
    if not all(value.isascii() for value in headers.values()):
        # Internationalized addresses need SMTPUTF8, which `EmailMessage` (policy.default)
        # handles: the slow path, kept for the rare mailbox that needs it.
        return _international_message(subject, headers, text, html)
    # The common case, built with the compat32 MIME classes: about ten times cheaper than
    # `EmailMessage.set_content` + `add_alternative` (header registry parsing per header), and
    # the same standard message: multipart/alternative, text then HTML, UTF-8 parts.
    # The boundary comes from the key, so a resend is byte-for-byte the same message, and the
    # generator skips its scan of the body for a random boundary. Both parts are base64 (UTF-8
    # MIMEText), and base64 has no "-", so no body line can start with "--billhook-".
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]
    message = MIMEMultipart("alternative", boundary=f"billhook-{digest}")
    message["Subject"] = subject if subject.isascii() else Header(subject, "utf-8").encode()
    for name, value in headers.items():
        message[name] = value
    message.attach(MIMEText(text, "plain", "utf-8"))
    message.attach(MIMEText(html, "html", "utf-8"))
    return message


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


def _render(environment: jinja2.Environment, name: str, context: Mapping[str, Any]) -> str:
    try:
        return environment.get_template(name).render(context)
    except jinja2.TemplateNotFound as exc:
        raise EffectUnsendable(
            f"no email template {name!r} for this effect kind; add it to the templates directory "
            f"(BILLHOOK_TEMPLATES_DIR) and redrive"
        ) from exc
    except jinja2.TemplateError as exc:
        raise EffectUnsendable(
            f"email template {name!r} failed: {exc}; fix it and redrive"
        ) from exc


@lru_cache(maxsize=8)
def _environment(templates_dir: str) -> jinja2.Environment:
    loaders: list[jinja2.BaseLoader] = []
    if templates_dir:
        loaders.append(jinja2.FileSystemLoader(templates_dir))
    loaders.append(jinja2.PackageLoader("billhook.effects", "templates"))
    return jinja2.Environment(
        loader=jinja2.ChoiceLoader(loaders),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default=False),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
