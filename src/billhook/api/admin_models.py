"""Response bodies of the admin API: pydantic models, so `/api/v1/openapi.json` is exact.

Each model is built from the `ops/` value it shows (`from_value`), never from a database row:
the API shows what the use cases return, nothing it computed itself.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from billhook.effects.deadletter import DeadEffect
from billhook.ops.audit import AuditEntry
from billhook.ops.dlq import DeadJob
from billhook.ops.events import DeliveryView, EventDetail, EventSummary
from billhook.ops.invoices import InvoiceView
from billhook.queue.jobs import Job


class ErrorBody(BaseModel):
    detail: str = Field(description="What went wrong and what to do about it.")


class Invoice(BaseModel):
    id: str
    source: str
    number: str | None
    status: str | None = Field(
        description="draft, open, paid, partially_refunded, refunded, void or uncollectible; "
        "null before the first lifecycle event"
    )
    disputed: bool
    currency: str | None
    amount_due: int = Field(description="In the currency's smallest unit.")
    amount_paid: int
    amount_refunded: int
    customer_email: str | None
    attention: str | None = Field(description="Why an operator should look; null when fine.")
    created_at: float = Field(description="Epoch seconds.")
    updated_at: float

    @classmethod
    def from_value(cls, value: InvoiceView) -> Invoice:
        return cls(**value.__dict__)


class InvoicePage(BaseModel):
    items: list[Invoice]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null at end.")


class Event(BaseModel):
    id: int = Field(description="billhook's id for the stored event.")
    source: str
    event_id: str = Field(description="The provider's id (evt_..., msg_...).")
    type: str
    ordering_key: str
    occurred_at: float | None
    received_at: float
    last_seen_at: float
    delivery_count: int
    outcome: str = Field(description="pending, processed, ignored or failed")
    processed_at: float | None

    @classmethod
    def from_value(cls, value: EventSummary) -> Event:
        return cls(**value.__dict__)


class EventPage(BaseModel):
    items: list[Event]
    next_cursor: str | None


class Delivery(BaseModel):
    id: int
    received_at: float
    outcome: str = Field(description="accepted or duplicate")

    @classmethod
    def from_value(cls, value: DeliveryView) -> Delivery:
        return cls(**value.__dict__)


class EventWithBody(Event):
    headers: dict[str, str]
    body: str = Field(description="The raw body as received, decoded as UTF-8.")
    body_is_utf8: bool = Field(description="False when undecodable bytes were replaced.")
    deliveries: list[Delivery]

    @classmethod
    def from_detail(cls, value: EventDetail) -> EventWithBody:
        return cls(
            **value.event.__dict__,
            headers=value.headers,
            body=value.body,
            body_is_utf8=value.body_is_utf8,
            deliveries=[Delivery.from_value(d) for d in value.deliveries],
        )


class AuditRecord(BaseModel):
    id: int
    at: float
    actor: str = Field(description="Token name, or cli:<os user> for the command line.")
    action: str
    params: dict[str, Any]
    outcome: str = Field(description="ok, refused: ..., failed: ..., or started (no end seen)")

    @classmethod
    def from_value(cls, value: AuditEntry) -> AuditRecord:
        return cls(**value.__dict__)


class AuditPage(BaseModel):
    items: list[AuditRecord]
    next_before_id: int | None = Field(description="Pass as `before_id` for older entries.")


class JobPage(BaseModel):
    items: list[Job]
    next_cursor: str | None


class DeadLetterPage(BaseModel):
    items: list[DeadJob]
    next_after_id: int | None = Field(description="Pass as `after_id` for the next page.")


class DeadEffectPage(BaseModel):
    items: list[DeadEffect]


class Redriven(BaseModel):
    redriven: int
    job_ids: list[int]
