"""`POST /api/v1/replay`: request and response bodies, exact in the OpenAPI schema.

The request is one of three shapes, told apart by `by` (events | invoice | filter), so the
schema itself says what the use case accepts: any body valid against it is a valid replay.
`dry_run` defaults to true: over HTTP there is no confirmation prompt, so acting is explicit.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from billhook.ops.replay import (
    EffectPreview,
    EventFailure,
    FieldChange,
    InvoiceDiff,
    ReplayRequest,
    ReplayResult,
    Selection,
)

ResendKind = Literal["payment_receipt", "refund_notice", "payment_failed_notice"]
Source = Literal["stripe", "standard"]

# PostgreSQL text cannot hold NUL: such an id can match nothing, so the schema refuses it.
_NO_NUL = r"^[^\x00]+$"
_Id = Annotated[str, Field(min_length=1, max_length=255, pattern=_NO_NUL)]
_Epoch = Annotated[float, Field(ge=0, le=1e11, allow_inf_nan=False)]


class _Options(BaseModel):
    # An option of another shape (`rebuild` with `by: events`) is refused, not ignored.
    model_config = ConfigDict(extra="forbid")

    dry_run: bool = Field(True, description="Compute and show the diff; write nothing.")
    resend_effects: ResendKind | None = Field(
        None,
        description="Put the sent effects of this kind of the affected invoices back to pending "
        "under the same idempotency key (audited with the keys).",
    )


class ReplayEvents(_Options):
    by: Literal["events"]
    event_ids: list[_Id] = Field(min_length=1, max_length=1000, description="Provider ids.")
    source: Source | None = None

    def to_request(self) -> ReplayRequest:
        selection = Selection(event_ids=tuple(self.event_ids), source=self.source)
        return ReplayRequest(selection, self.dry_run, False, self.resend_effects)


class ReplayInvoice(_Options):
    by: Literal["invoice"]
    invoice_id: _Id
    rebuild: bool = Field(
        False, description="Recompute the invoice from all its stored events, from empty."
    )

    def to_request(self) -> ReplayRequest:
        selection = Selection(invoice_id=self.invoice_id)
        return ReplayRequest(selection, self.dry_run, self.rebuild, self.resend_effects)


class ReplayFilter(_Options):
    by: Literal["filter"]
    since: _Epoch = Field(description="Received at or after (epoch seconds).")
    until: _Epoch | None = Field(None, description="Received before (epoch seconds).")
    type: Annotated[str, Field(min_length=1, max_length=255, pattern=_NO_NUL)] | None = None
    source: Source | None = None

    def to_request(self) -> ReplayRequest:
        selection = Selection(
            since=self.since, until=self.until, type=self.type, source=self.source
        )
        return ReplayRequest(selection, self.dry_run, False, self.resend_effects)


ReplayBody = Annotated[ReplayEvents | ReplayInvoice | ReplayFilter, Field(discriminator="by")]


class Change(BaseModel):
    field: str
    before: Any
    after: Any

    @classmethod
    def from_value(cls, value: FieldChange) -> Change:
        return cls(field=value.field, before=value.before, after=value.after)


class Effect(BaseModel):
    kind: str
    idempotency_key: str

    @classmethod
    def from_value(cls, value: EffectPreview) -> Effect:
        return cls(kind=value.kind, idempotency_key=value.idempotency_key)


class Diff(BaseModel):
    invoice_id: str
    known: bool = Field(description="False when the replay would create the invoice.")
    events: int
    changes: list[Change] = Field(description="Field: before → after.")
    new_effects: list[Effect] = Field(description="Effects not in the outbox yet.")
    resend: list[str] = Field(description="Idempotency keys of sent effects put back to pending.")

    @classmethod
    def from_value(cls, value: InvoiceDiff) -> Diff:
        return cls(
            invoice_id=value.invoice_id,
            known=value.known,
            events=value.events,
            changes=[Change.from_value(c) for c in value.changes],
            new_effects=[Effect.from_value(e) for e in value.new_effects],
            resend=list(value.resend),
        )


class Failure(BaseModel):
    event_id: str
    source: str
    error: str

    @classmethod
    def from_value(cls, value: EventFailure) -> Failure:
        return cls(event_id=value.event_id, source=value.source, error=value.error)


class ReplayOutcome(BaseModel):
    dry_run: bool
    changed: bool = Field(description="A dry run found something to change (CLI exit code 3).")
    events: int = Field(description="Stored events selected.")
    invoices: int = Field(description="Invoices they are about.")
    applied: int
    ignored: int = Field(description="Events of types billing does not use.")
    failed: list[Failure] = Field(description="Events that could not be applied; not fatal.")
    diffs: list[Diff] = Field(description="Invoices that (would) change.")
    unchanged: int
    rebuilt: bool
    resent: list[str]

    @classmethod
    def from_value(cls, value: ReplayResult) -> ReplayOutcome:
        return cls(
            dry_run=value.dry_run,
            changed=value.changed,
            events=value.events,
            invoices=value.invoices,
            applied=value.applied,
            ignored=value.ignored,
            failed=[Failure.from_value(f) for f in value.failed],
            diffs=[Diff.from_value(d) for d in value.diffs],
            unchanged=value.unchanged,
            rebuilt=value.rebuilt,
            resent=list(value.resent),
        )
