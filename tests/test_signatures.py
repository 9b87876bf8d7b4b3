"""Every shared signature case through billhook's verifiers, and where billhook is stricter."""

from __future__ import annotations

import ast
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import standardwebhooks
import stripe as stripe_sdk

from billhook.errors import MalformedPayload, SignatureError, TimestampError
from billhook.sources import standard, stripe

TOLERANCE = 300

# Cases where billhook deliberately answers differently from the SDK's own expectation.
STRICTER_STRIPE = {
    # The SDK skips the age check when tolerance is None; billhook always enforces it.
    "valid_old_timestamp_when_tolerance_disabled": TimestampError,
    # The Stripe SDKs accept timestamps from the future; billhook refuses them beyond tolerance.
    "valid_future_timestamp_not_checked_by_stripe_sdks": TimestampError,
}


def _cases(fixtures_dir: Path, name: str) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads((fixtures_dir / "signatures" / name).read_text())[
        "cases"
    ]
    return cases


def _payload(case: dict[str, Any], fixtures_dir: Path) -> bytes:
    if case.get("payload") is not None:
        return str(case["payload"]).encode()
    return (fixtures_dir / case["payload_file"]).read_bytes()


def _stripe_outcome(case: dict[str, Any], fixtures_dir: Path) -> type[Exception] | None:
    payload = _payload(case, fixtures_dir)
    try:
        stripe.verify(
            payload,
            case["header"],
            [case["secret"]],
            now=case["now"],
            tolerance=case["tolerance"] or TOLERANCE,
        )
        if case["name"] == "signature_valid_but_payload_not_json":
            stripe.parse(payload, {}, signed_at=case["now"])
    except (SignatureError, TimestampError, MalformedPayload) as exc:
        return type(exc)
    return None


def test_every_stripe_case(fixtures_dir: Path) -> None:
    cases = _cases(fixtures_dir, "stripe_signature_cases.json")
    assert len(cases) >= 26
    for case in cases:
        outcome = _stripe_outcome(case, fixtures_dir)
        if case["name"] in STRICTER_STRIPE:
            assert outcome is STRICTER_STRIPE[case["name"]], case["name"]
        elif case["expected"] == "valid":
            assert outcome is None, case["name"]
        else:
            assert outcome is not None, case["name"]
            if case.get("signature_correct") and case["name"].startswith("invalid_"):
                assert outcome is TimestampError, case["name"]


def test_stripe_sdk_accepts_a_future_timestamp_billhook_refuses() -> None:
    """Stricter than the SDK: a correctly signed `t` an hour ahead is refused by billhook.

    The SDK's only check is `t < time.time() - tolerance`, so a future `t` always passes it
    (fixture case `valid_future_timestamp_not_checked_by_stripe_sdks`).
    """
    now = int(time.time())
    payload = '{"id": "evt_future", "type": "invoice.paid"}'
    header = stripe_sdk.WebhookSignature.generate_signature_header(
        payload, "whsec_test_secret", timestamp=now + 3600
    )
    assert stripe_sdk.WebhookSignature.verify_header(
        payload, header, "whsec_test_secret", tolerance=TOLERANCE
    )
    with pytest.raises(TimestampError, match="in the future"):
        stripe.verify(
            payload.encode(), header, ["whsec_test_secret"], now=now, tolerance=TOLERANCE
        )
    # Within the tolerance, a slightly fast sender clock is fine.
    near = stripe.sign(payload.encode(), "whsec_test_secret", now + TOLERANCE)
    assert stripe.verify(payload.encode(), near, ["whsec_test_secret"], now=now, tolerance=300)


def test_stripe_rotation_and_our_signer_agree_with_the_sdk() -> None:
    body = b'{"id": "evt_1", "type": "invoice.paid"}'
    header = stripe_sdk.WebhookSignature.generate_signature_header(
        body.decode(), "whsec_new", timestamp=1_700_000_000
    )
    assert stripe.sign(body, "whsec_new", 1_700_000_000) == header
    now = 1_700_000_010
    assert stripe.verify(body, header, ["whsec_old", "whsec_new"], now=now, tolerance=300)
    with pytest.raises(SignatureError):
        stripe.verify(body, header, ["whsec_old"], now=now, tolerance=300)
    with pytest.raises(SignatureError, match="BILLHOOK_STRIPE_WEBHOOK_SECRETS"):
        stripe.verify(body, header, [], now=now, tolerance=300)


def _headers(case: dict[str, Any]) -> dict[str, str]:
    raw = case.get("headers_override") or case["headers"]
    headers = raw if isinstance(raw, dict) else ast.literal_eval(raw)
    return {str(k).lower(): str(v) for k, v in headers.items()}


def test_every_standard_webhooks_case(fixtures_dir: Path) -> None:
    cases = _cases(fixtures_dir, "standard_webhooks_cases.json")
    assert len(cases) >= 25
    for case in cases:
        payload = _payload(case, fixtures_dir)
        try:
            msg_id, _ = standard.verify(
                payload,
                _headers(case),
                [case["secret"]],
                now=case["now"],
                tolerance=case["tolerance_seconds"],
            )
        except (SignatureError, TimestampError) as exc:
            assert case["expected"] == "invalid", (case["name"], exc)
        else:
            assert case["expected"] == "valid", case["name"]
            assert msg_id == case["msg_id"]


def test_standard_signer_agrees_with_the_library_and_rotation() -> None:
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"id": "e1", "type": "invoice.paid", "data": {"invoice_id": "in_1"}}'
    moment = datetime.fromtimestamp(1_700_000_000, tz=UTC)
    expected = standardwebhooks.Webhook(secret).sign("msg_1", moment, body.decode())
    headers = standard.sign(body, secret, "msg_1", 1_700_000_000)
    assert headers["webhook-signature"] == expected
    other = "whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB"
    assert standard.verify(body, headers, [other, secret], now=1_700_000_000, tolerance=300)
    with pytest.raises(SignatureError):
        standard.verify(body, headers, [other], now=1_700_000_000, tolerance=300)


def test_ordering_keys_of_real_stripe_events(fixtures_dir: Path) -> None:
    events = fixtures_dir / "stripe_events"

    def key(name: str) -> str:
        return stripe.ordering_key(json.loads((events / name).read_text()))

    assert key("invoice.paid--stripe-sync-engine.json") == "in_1KJqKBJDPojXS6LNJbvLUgEy"
    assert key("charge.refunded--stripe-sync-engine.json") == "in_1KJdKkJDPojXS6LNSwSWkZSN"
    assert key("invoice_payment.paid--stripe-sync-engine.json") == "in_103Q0w2eZvKYlo2C5PYwf6Wf"
    assert key("refund.created--stripe-sync-engine.json") == "charge:ch_1NirD82eZvKYlo2CIvbtLWuY"
    assert (
        key("charge.dispute.created--stripe-sync-engine.json")
        == "charge:ch_1IqtGAJDPojXS6LNstgEfUji"
    )
    assert key("charge.succeeded--stripe-ruby-mock.json") == "charge:ch_000000000000000000000000"
    plan = key("plan.created--stripe-openapi-fixtures3.json")
    assert plan == "event:evt_1Pgc76B7WZ01zgkWwyRHS12y"


def test_canonical_occurred_at_forms() -> None:
    assert standard.parse_occurred_at("2024-01-02T03:04:05Z") == 1704164645.0
    assert standard.parse_occurred_at("2024-01-02T04:04:05+01:00") == 1704164645.0
    assert standard.parse_occurred_at(1704164645) == 1704164645.0
    assert standard.parse_occurred_at("2024-01-02T03:04:05") is None  # no offset: ambiguous
    assert standard.parse_occurred_at("yesterday") is None
    assert standard.parse_occurred_at(True) is None
