"""The email written straight to wire bytes is, byte for byte, what the email package writes for
the same message (compat32 MIME classes, CRLF): generated headers and bodies, folding included."""

from __future__ import annotations

import email
import os
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billhook.config import Settings
from billhook.effects import render
from billhook.effects.render import (
    _WIRE_POLICY,
    EffectUnsendable,
    _ascii_wire,
    _fold_words,
    compat32_message,
    message_id,
    render_email,
)

BOUNDARY = "billhook-" + "0123456789abcdef" * 2
# Printable ASCII with runs of spaces (where folding happens), some non-ASCII and control
# characters (which take the email package's own path).
ascii_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=160)
any_text = st.text(
    st.one_of(
        st.characters(min_codepoint=32, max_codepoint=126),
        st.sampled_from(["é", "€", "\u2028", "\t", "—", "ü"]),
    ),
    max_size=160,
)


@settings(max_examples=400)
@given(
    subject=st.one_of(ascii_text, any_text),
    recipient=st.one_of(st.emails(), ascii_text.filter(bool)),
    key=ascii_text.filter(bool),
    text=any_text,
    html=any_text,
)
def test_wire_bytes_equal_the_email_packages(
    subject: str, recipient: str, key: str, text: str, html: str
) -> None:
    subject = " ".join(subject.split())
    headers = {
        "From": "billing@billhook.localhost",
        "To": recipient,
        "Date": "Tue, 14 Nov 2023 22:13:20 GMT",
        "Message-ID": message_id(key, "payment_receipt"),
        "X-Billhook-Idempotency-Key": key,
    }
    reference = compat32_message(subject, headers, text, html, boundary=BOUNDARY)
    assert _ascii_wire(subject, headers, text, html, boundary=BOUNDARY) == reference.as_bytes(
        policy=_WIRE_POLICY
    )


def test_a_rendered_receipt_parses_back_to_its_parts(tmp_path: Path) -> None:
    settings_ = Settings(database_url="sqlite://", data_dir=str(tmp_path))
    rendered = render_email(
        kind="payment_receipt",
        idempotency_key="payment_receipt:in_1",
        payload={"invoice_id": "in_1", "number": "N-1", "currency": "eur", "amount": 1234},
        recipient="jane@example.com",
        created_at=1_700_000_000.0,
        settings=settings_,
    )
    assert b"\r\n" in rendered.raw and b"\n" not in rendered.raw.replace(b"\r\n", b"")
    parsed = email.message_from_bytes(rendered.raw, policy=default_policy)
    assert isinstance(parsed, EmailMessage)
    assert (
        parsed["Message-ID"]
        == rendered.message_id
        == message_id("payment_receipt:in_1", "payment_receipt")
    )
    # compat32 puts a long encoded subject on a continuation line: unfolded, it starts with FWS.
    assert str(parsed["Subject"]).strip() == "Receipt for invoice N-1 (in_1): €12.34 paid"
    text = parsed.get_body(preferencelist=("plain",))
    html = parsed.get_body(preferencelist=("html",))
    assert text is not None and "€12.34" in str(text.get_content())
    assert html is not None and "<strong>€12.34</strong>" in str(html.get_content())
    assert not rendered.international


def test_a_line_break_in_the_address_is_unsendable_not_an_injected_header(tmp_path: Path) -> None:
    settings_ = Settings(database_url="sqlite://", data_dir=str(tmp_path))
    with pytest.raises(EffectUnsendable, match="cannot be written"):
        render_email(
            kind="payment_receipt",
            idempotency_key="payment_receipt:in_2",
            payload={"invoice_id": "in_2", "currency": "usd", "amount": 100},
            recipient="jane@example.com\r\nBcc: everyone@example.com",
            created_at=1.0,
            settings=settings_,
        )


words = st.lists(
    st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=90),
    min_size=1,
    max_size=14,
)


@settings(max_examples=1000)
@given(words=words, name=st.sampled_from(["Subject", "To", "X-Billhook-Idempotency-Key"]))
def test_folding_words_is_what_compat32_writes(words: list[str], name: str) -> None:
    value = " ".join(words)
    folded = _fold_words(name, value)
    if folded is not None:  # None: compat32 folds it (a ";" or ",", a long first word)
        assert folded == _WIRE_POLICY.fold_binary(name, value)


def test_a_long_plain_subject_takes_the_direct_fold() -> None:
    subject = "Receipt for invoice ABCD-0001 (in_1234567890abcdef12345678): $19.99 paid"
    folded = _fold_words("Subject", subject)
    assert folded is not None and folded == _WIRE_POLICY.fold_binary("Subject", subject)


def test_an_edited_template_is_used_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    source = templates / "payment_receipt.subject.j2"
    source.write_text("First {{ invoice_id }}")
    settings_ = Settings(
        database_url="sqlite://", data_dir=str(tmp_path), templates_dir=str(templates)
    )

    def subject() -> str:
        rendered = render_email(
            kind="payment_receipt",
            idempotency_key="payment_receipt:in_edit",
            payload={"invoice_id": "in_edit", "currency": "usd", "amount": 100},
            recipient="jane@example.com",
            created_at=1.0,
            settings=settings_,
        )
        return str(email.message_from_bytes(rendered.raw)["Subject"])

    assert subject() == "First in_edit"
    source.write_text("Second {{ invoice_id }}")
    stamp = source.stat().st_mtime + 5
    os.utime(source, (stamp, stamp))
    # Compiled templates are looked at again once TEMPLATE_RECHECK_SECONDS have passed.
    monkeypatch.setattr(render, "TEMPLATE_RECHECK_SECONDS", 0.0)
    assert subject() == "Second in_edit"
