"""Every refusal: its status, a detail that says what to fix, a metric, and nothing stored."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from billhook.api.app import create_app
from billhook.sources import stripe
from live_server import running_app
from test_ingest_http import (
    STANDARD_SECRET,
    STRIPE_SECRET,
    canonical,
    counts,
    make_settings,
    standard_headers,
    stripe_headers,
)

LIMIT = 4096
_CLIENT = httpx.Client()  # one client: creating one per request costs more than the request
EVENT = json.dumps({"id": "evt_refused", "type": "invoice.paid"}).encode()


@dataclass(frozen=True)
class Refusal:
    name: str
    path: str
    body: bytes
    headers: dict[str, str]
    status: int
    outcome: str
    detail: str


def _stripe(name: str, body: bytes, headers: dict[str, str], **expect: object) -> Refusal:
    return Refusal(name, "/webhooks/stripe", body, headers, **expect)  # type: ignore[arg-type]


def _standard(name: str, body: bytes, headers: dict[str, str], **expect: object) -> Refusal:
    return Refusal(name, "/webhooks/standard", body, headers, **expect)  # type: ignore[arg-type]


def refusals() -> list[Refusal]:
    now = int(time.time())
    sig = "rejected_signature"
    ts = "rejected_timestamp"
    bad = "rejected_malformed"
    no_invoice = json.dumps({"id": "e", "type": "invoice.paid", "data": {}}).encode()
    long_id = json.dumps({"id": "evt_" + "x" * 300, "type": "invoice.paid"}).encode()
    return [
        _stripe("stripe_missing_header", EVENT, {}, status=400, outcome=sig,
                detail="missing Stripe-Signature"),
        _stripe("stripe_unreadable_header", EVENT, {"Stripe-Signature": "nonsense"},
                status=400, outcome=sig, detail="cannot read Stripe-Signature"),
        _stripe("stripe_v0_only", EVENT, {"Stripe-Signature": f"t={now},v0=abc"},
                status=400, outcome=sig, detail="no v1 signature"),
        _stripe("stripe_unknown_secret", EVENT,
                {"Stripe-Signature": stripe.sign(EVENT, "whsec_someone_else", now)},
                status=400, outcome=sig, detail="does not match"),
        _stripe("stripe_body_altered", EVENT + b" ", stripe_headers(EVENT),
                status=400, outcome=sig, detail="does not match"),
        _stripe("stripe_expired", EVENT, stripe_headers(EVENT, now - 900),
                status=400, outcome=ts, detail="old"),
        _stripe("stripe_future", EVENT, stripe_headers(EVENT, now + 3600),
                status=400, outcome=ts, detail="in the future"),
        _stripe("stripe_not_json", b"not json", stripe_headers(b"not json"),
                status=400, outcome=bad, detail="not valid JSON"),
        _stripe("stripe_not_object", b"[1, 2]", stripe_headers(b"[1, 2]"),
                status=400, outcome=bad, detail="not an object"),
        _stripe("stripe_no_type", b'{"id": "evt_x"}', stripe_headers(b'{"id": "evt_x"}'),
                status=400, outcome=bad, detail="'type'"),
        _stripe("stripe_id_too_long", long_id, stripe_headers(long_id),
                status=400, outcome=bad, detail="over 255 characters"),
        _standard("standard_missing_headers", canonical("e1"), {}, status=400, outcome=sig,
                  detail="missing webhook-id, webhook-timestamp and webhook-signature"),
        _standard("standard_missing_signature", canonical("e1"),
                  {"webhook-id": "m", "webhook-timestamp": str(now)},
                  status=400, outcome=sig, detail="missing webhook-signature"),
        _standard("standard_wrong_id", canonical("e1"),
                  {**standard_headers(canonical("e1"), "msg_a"), "webhook-id": "msg_b"},
                  status=400, outcome=sig, detail="does not match"),
        _standard("standard_expired", canonical("e1"),
                  standard_headers(canonical("e1"), "m",
                                   datetime.fromtimestamp(now - 900, tz=UTC)),
                  status=400, outcome=ts, detail="old"),
        _standard("standard_future", canonical("e1"),
                  standard_headers(canonical("e1"), "m",
                                   datetime.fromtimestamp(now + 900, tz=UTC)),
                  status=400, outcome=ts, detail="in the future"),
        _standard("standard_no_invoice", no_invoice, standard_headers(no_invoice, "m"),
                  status=400, outcome=bad, detail="data.invoice_id"),
        _stripe("too_large_declared", b"x" * (LIMIT + 1), stripe_headers(b"x" * (LIMIT + 1)),
                status=413, outcome="rejected_too_large", detail=f"over the {LIMIT} byte limit"),
    ]


@pytest.fixture
def server(sqlite_url: str, tmp_path: Path) -> Iterator[str]:
    app = create_app(make_settings(sqlite_url, tmp_path, max_body_bytes=LIMIT))
    with running_app(app) as base_url:
        yield base_url


def received(base_url: str) -> dict[tuple[str, str], float]:
    text = _CLIENT.get(base_url + "/metrics").text
    return {
        (s.labels["source"], s.labels["outcome"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "billhook_webhooks_received"
        for s in family.samples
        if s.name.endswith("_total")
    }


def test_every_refusal(server: str, sqlite_url: str, capfd: pytest.CaptureFixture[str]) -> None:
    cases = refusals()
    for case in cases:
        before = received(server)
        response = _CLIENT.post(server + case.path, content=case.body, headers=case.headers)
        assert response.status_code == case.status, (case.name, response.text)
        assert response.headers["content-type"] == "application/json", case.name
        assert case.detail in response.json()["detail"], (case.name, response.json())
        source = "stripe" if "stripe" in case.path else "standard"
        after = received(server)
        assert after[(source, case.outcome)] == before[(source, case.outcome)] + 1, case.name
        assert counts(sqlite_url) == (0, 0, 0), case.name
    logs = capfd.readouterr()
    for case in cases:  # the log says which check failed, never the signature or a secret
        for name, value in case.headers.items():
            if name.lower() in ("stripe-signature", "webhook-signature") and len(value) > 20:
                assert value.split("v1")[-1][1:] not in logs.out + logs.err, case.name
    assert STRIPE_SECRET not in logs.out + logs.err
    assert STANDARD_SECRET not in logs.out + logs.err


def _chunks(total: int, size: int = 1024) -> Callable[[], Iterator[bytes]]:
    def generate() -> Iterator[bytes]:
        sent = 0
        while sent < total:
            yield b"x" * min(size, total - sent)
            sent += size

    return generate


def test_chunked_body_over_the_limit_is_refused_while_read(server: str, sqlite_url: str) -> None:
    before = received(server)
    # A generator body is sent chunked, without Content-Length: the cap applies while reading.
    response = httpx.post(
        server + "/webhooks/stripe",
        content=_chunks(LIMIT * 50)(),
        headers={"Stripe-Signature": f"t={int(time.time())},v1=00"},
    )
    assert response.status_code == 413
    assert f"over the {LIMIT} byte limit" in response.json()["detail"]
    assert received(server)[("stripe", "rejected_too_large")] == (
        before[("stripe", "rejected_too_large")] + 1
    )
    assert counts(sqlite_url) == (0, 0, 0)


def test_chunked_body_within_the_limit_is_accepted(server: str, sqlite_url: str) -> None:
    body = json.dumps({"id": "evt_chunked", "type": "invoice.paid", "pad": "y" * 3000}).encode()
    response = httpx.post(
        server + "/webhooks/stripe",
        content=iter([body[:1000], body[1000:]]),
        headers=stripe_headers(body),
    )
    assert response.status_code == 200, response.text
    assert counts(sqlite_url) == (1, 1, 1)


def test_body_exactly_at_the_limit_is_accepted(server: str) -> None:
    prefix = b'{"id": "evt_limit", "type": "invoice.paid", "pad": "'
    body = prefix + b"z" * (LIMIT - len(prefix) - 2) + b'"}'
    assert len(body) == LIMIT
    response = httpx.post(server + "/webhooks/stripe", content=body, headers=stripe_headers(body))
    assert response.status_code == 200, response.text


def test_rotation_accepts_every_configured_secret(server: str) -> None:
    now = int(time.time())
    response = httpx.post(
        server + "/webhooks/stripe",
        content=EVENT,
        headers={"Stripe-Signature": stripe.sign(EVENT, "whsec_retired", now)},
    )
    assert response.status_code == 200, response.text
