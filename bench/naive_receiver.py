"""THE ANTI-EXAMPLE. Do not copy this receiver: it is here so `billhook simulate` can show why.

This is the webhook receiver a quick demo writes (and many production systems still run):
verify the signature, parse, update the invoice row from the payload, send the email right
away, return 200. On a good day it looks correct. `billhook simulate --target` shows what it
does on a bad day:

* a retried or duplicated `invoice.paid` sends the receipt again, under a new Message-ID;
* a late `invoice.finalized` (its snapshot says `open`) moves a paid invoice back to open;
* a refund that arrives before its payment is applied to an unknown row and lost;
* a crash between the UPDATE and the email loses the email; a crash after it sends it twice.

Run: `BILLHOOK_PORT=8001 BILLHOOK_SMTP_URL=smtp://127.0.0.1:1025 \
BILLHOOK_STRIPE_WEBHOOK_SECRETS=whsec_x python bench/naive_receiver.py`
then `billhook simulate --target http://127.0.0.1:8001 --smtp-port 1025`.
It serves `POST /webhooks/stripe` and `GET /api/v1/invoices/{id}` (no auth: a demo).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import smtplib
import sqlite3
import tempfile
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any
from urllib.parse import urlparse

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

DB_PATH = os.environ.get("NAIVE_DB", os.path.join(tempfile.mkdtemp(), "naive.db"))
SECRETS = [s for s in os.environ.get("BILLHOOK_STRIPE_WEBHOOK_SECRETS", "").split(",") if s]
SMTP = urlparse(os.environ.get("BILLHOOK_SMTP_URL", "smtp://127.0.0.1:1025"))


def db() -> sqlite3.Connection:
    connection = sqlite3.connect(DB_PATH, timeout=30)
    connection.execute(
        "CREATE TABLE IF NOT EXISTS invoices (id TEXT PRIMARY KEY, status TEXT, currency TEXT,"
        " amount_due INT, amount_paid INT, amount_refunded INT DEFAULT 0, customer_email TEXT,"
        " disputed INT DEFAULT 0, charge TEXT)"
    )
    return connection


def send_email(to: str, subject: str, text: str) -> None:
    message = EmailMessage()
    message["From"] = "billing@naive.example"
    message["To"] = to or "unknown@example.com"
    message["Subject"] = subject
    message["Message-ID"] = make_msgid()
    message.set_content(text)
    with smtplib.SMTP(SMTP.hostname or "127.0.0.1", SMTP.port or 25, timeout=10) as smtp:
        smtp.send_message(message)


def verify(body: bytes, header: str) -> bool:
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    signed = f"{parts.get('t', '')}.".encode() + body
    expected = [hmac.new(s.encode(), signed, hashlib.sha256).hexdigest() for s in SECRETS]
    return parts.get("v1", "") in expected


async def stripe_webhook(request: Request) -> JSONResponse:
    body = await request.body()
    if not verify(body, request.headers.get("stripe-signature", "")):
        return JSONResponse({"detail": "bad signature"}, status_code=400)
    event = json.loads(body)
    obj: dict[str, Any] = event["data"]["object"]
    kind = event["type"]
    connection = db()
    with connection:
        if kind.startswith("invoice."):
            connection.execute(
                "INSERT OR REPLACE INTO invoices (id, status, currency, amount_due, amount_paid,"
                " customer_email, charge, amount_refunded, disputed) VALUES (?,?,?,?,?,?,?,"
                " COALESCE((SELECT amount_refunded FROM invoices WHERE id = ?), 0),"
                " COALESCE((SELECT disputed FROM invoices WHERE id = ?), 0))",
                (
                    obj["id"],
                    obj["status"],
                    obj["currency"],
                    obj["amount_due"],
                    obj["amount_paid"],
                    obj.get("customer_email"),
                    obj.get("charge"),
                    obj["id"],
                    obj["id"],
                ),
            )
            if kind == "invoice.paid":
                send_email(
                    obj.get("customer_email"),
                    f"Payment receipt for invoice {obj['id']}",
                    f"Thank you, we received your payment for invoice {obj['id']}.",
                )
            if kind == "invoice.payment_failed":
                send_email(
                    obj.get("customer_email"),
                    f"Payment failed for invoice {obj['id']} (attempt {obj['attempt_count']})",
                    "Please update your card.",
                )
        elif kind == "charge.refunded":
            status = "refunded" if obj["refunded"] else "partially_refunded"
            connection.execute(
                "UPDATE invoices SET amount_refunded = ?, status = ? WHERE id = ?",
                (obj["amount_refunded"], status, obj["invoice"]),
            )
            latest = obj["refunds"]["data"][0]
            send_email(
                obj.get("receipt_email"),
                f"Refund {latest['id']} for invoice {obj['invoice']}",
                f"We refunded {latest['amount']} {obj['currency']}.",
            )
        elif kind in ("charge.dispute.created", "charge.dispute.closed"):
            connection.execute(
                "UPDATE invoices SET disputed = ? WHERE charge = ?",
                (kind.endswith("created"), obj["charge"]),
            )
    connection.close()
    return JSONResponse({"status": "accepted", "event_id": event["id"]})


async def get_invoice(request: Request) -> JSONResponse:
    connection = db()
    row = connection.execute(
        "SELECT id, status, currency, amount_due, amount_paid, amount_refunded, customer_email,"
        " disputed FROM invoices WHERE id = ?",
        (request.path_params["invoice_id"],),
    ).fetchone()
    connection.close()
    if row is None:
        return JSONResponse({"detail": "not found"}, status_code=404)
    names = (
        "id",
        "status",
        "currency",
        "amount_due",
        "amount_paid",
        "amount_refunded",
        "customer_email",
        "disputed",
    )
    invoice = dict(zip(names, row, strict=True))
    invoice["disputed"] = bool(invoice["disputed"])
    return JSONResponse(invoice)


app = Starlette(
    routes=[
        Route("/webhooks/stripe", stripe_webhook, methods=["POST"]),
        Route("/api/v1/invoices/{invoice_id}", get_invoice, methods=["GET"]),
    ]
)

if __name__ == "__main__":
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(os.environ.get("BILLHOOK_PORT", "8001")),
        log_level="warning",
    )
