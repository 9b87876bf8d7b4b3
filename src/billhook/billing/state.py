"""An invoice's state: facts merged as a join-semilattice, and the view derived from them.

Every event is turned into the facts it states (`InvoiceState.of_event`) and joined into the
state. The join is commutative, associative and idempotent (minimum of milestone times, union
of refunds by id with the furthest status and the largest amount, union of failed attempts,
disputes with closed winning, snapshot fields from the most advanced snapshot), so any
permutation and any duplication of a history ends in the same state. The status is a monotone
function of the facts, so it never goes backwards either. Effects are emitted when `apply`
makes their condition newly true (`invoice.py`). Policies are written in docs/billing.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, Self, TypeVar, overload

from billhook.billing.events import LIFECYCLE_KINDS, REFUND_COUNTED, BillingEvent, EventKind
from billhook.errors import UnprocessableEvent

STATE_VERSION = 1
K = TypeVar("K")
V = TypeVar("V")


class InvoiceStatus(StrEnum):
    DRAFT = "draft"
    OPEN = "open"
    PAID = "paid"
    PARTIALLY_REFUNDED = "partially_refunded"
    REFUNDED = "refunded"
    VOID = "void"
    UNCOLLECTIBLE = "uncollectible"


# The lifecycle order: a status only ever moves to a higher rank. Paid outranks void and
# uncollectible (policy: money received wins); void outranks uncollectible (Stripe lets an
# uncollectible invoice be voided).
_RANK: dict[InvoiceStatus | None, int] = {
    None: 0,
    InvoiceStatus.DRAFT: 1,
    InvoiceStatus.OPEN: 2,
    InvoiceStatus.UNCOLLECTIBLE: 3,
    InvoiceStatus.VOID: 4,
    InvoiceStatus.PAID: 5,
    InvoiceStatus.PARTIALLY_REFUNDED: 6,
    InvoiceStatus.REFUNDED: 7,
}

CREATED, FINALIZED, PAID, VOIDED, UNCOLLECTIBLE = (
    "created",
    "finalized",
    "paid",
    "voided",
    "uncollectible",
)

_KIND_MILESTONE = {
    EventKind.CREATED: CREATED,
    EventKind.FINALIZED: FINALIZED,
    EventKind.PAYMENT_FAILED: FINALIZED,
    EventKind.PAID: PAID,
    EventKind.VOIDED: VOIDED,
    EventKind.MARKED_UNCOLLECTIBLE: UNCOLLECTIBLE,
}
_STATUS_MILESTONE = {
    "draft": CREATED,
    "open": FINALIZED,
    "paid": PAID,
    "partially_refunded": PAID,
    "refunded": PAID,
    "void": VOIDED,
    "uncollectible": UNCOLLECTIBLE,
}
# How far along the lifecycle a snapshot is: its fields outrank those of a less advanced one,
# whatever the timestamps (several events often share one second).
_SNAPSHOT_RANK = {
    "draft": 0,
    "open": 1,
    "uncollectible": 2,
    "void": 3,
    "paid": 4,
    "partially_refunded": 4,
    "refunded": 4,
}
_KIND_RANK = {
    EventKind.CREATED: 0,
    EventKind.FINALIZED: 1,
    EventKind.PAYMENT_FAILED: 1,
    EventKind.MARKED_UNCOLLECTIBLE: 2,
    EventKind.VOIDED: 3,
    EventKind.PAID: 4,
}
_NOT_A_SNAPSHOT = -1
_REFUND_STATUS_RANK = {
    "requires_action": 0,
    "pending": 1,
    "succeeded": 2,
    "canceled": 3,
    "failed": 3,
}

FIELDS = ("number", "currency", "customer_email", "amount_due", "amount_paid", "charge_id")


def lifecycle_rank(status: InvoiceStatus | None) -> int:
    return _RANK[status]


class computed_once(Generic[V]):
    """`functools.cached_property` without its lock.

    On Python 3.11 `cached_property` takes an RLock on every first read, which cost more than
    most of the values it guards (several per event applied). The values here are pure
    functions of frozen facts: two threads computing one at once would store equal values.
    """

    def __init__(self, func: Callable[[Any], V]) -> None:
        self.func = func
        self.name = func.__name__
        self.__doc__ = func.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> Self: ...

    @overload
    def __get__(self, instance: object, owner: type | None = None) -> V: ...

    def __get__(self, instance: object, owner: type | None = None) -> V | Self:
        if instance is None:
            return self
        # Stored in the instance's __dict__, which then answers later reads without this
        # descriptor (it defines no __set__); frozen dataclasses allow it, as for cached_property.
        value = instance.__dict__[self.name] = self.func(instance)
        return value


@dataclass(frozen=True)
class Pick:
    """A snapshot field's value and where it came from; the largest `order` wins."""

    value: str | int
    rank: int
    at: float
    event_id: str

    @property
    def order(self) -> tuple[int, float, str, str]:
        return (self.rank, self.at, self.event_id, str(self.value))


@dataclass(frozen=True)
class RefundRecord:
    refund_id: str
    amount: int
    status: str
    first_seen_at: float

    @property
    def counted(self) -> bool:
        return self.status in REFUND_COUNTED

    def join(self, other: RefundRecord) -> RefundRecord:
        status = max((self.status, other.status), key=lambda s: (_REFUND_STATUS_RANK.get(s, 0), s))
        return RefundRecord(
            self.refund_id,
            max(self.amount, other.amount),
            status,
            min(self.first_seen_at, other.first_seen_at),
        )


@dataclass(frozen=True)
class DisputeRecord:
    dispute_id: str
    status: str
    closed: bool

    def join(self, other: DisputeRecord) -> DisputeRecord:
        closed, status = max((self.closed, self.status), (other.closed, other.status))
        return DisputeRecord(self.dispute_id, status, closed)


@dataclass(frozen=True)
class InvoiceState:
    """Everything billhook knows about one invoice, as facts; the view is derived (properties).

    The facts never change after construction, so the derived views that the shell reads many
    times per event (status, refund totals, anomalies) are computed once per state."""

    invoice_id: str
    milestones: Mapping[str, float] = field(default_factory=dict)
    picks: Mapping[str, Pick] = field(default_factory=dict)
    refunds: Mapping[str, RefundRecord] = field(default_factory=dict)
    reported_refunded: int = 0
    failed_attempts: Mapping[int, float] = field(default_factory=dict)
    disputes: Mapping[str, DisputeRecord] = field(default_factory=dict)

    # -- facts ---------------------------------------------------------------------------

    @classmethod
    def of_event(cls, event: BillingEvent) -> InvoiceState:
        """The facts one event states about its invoice."""
        if event.invoice_id is None:
            raise UnprocessableEvent(
                f"{event.raw_type} {event.event_id} names charge {event.charge_id} but no invoice: "
                "resolve it through charge_links and pass event.with_invoice(invoice_id)"
            )
        at = event.occurred_at
        milestones: dict[str, float] = {}
        rank = _NOT_A_SNAPSHOT
        if event.type in LIFECYCLE_KINDS:
            found: list[tuple[str | None, float | None]] = [(_KIND_MILESTONE.get(event.type), at)]
            if event.status is not None:
                found.append((_STATUS_MILESTONE.get(event.status), at))
            t = event.transitions
            found += [
                (FINALIZED, t.finalized_at),
                (PAID, t.paid_at),
                (VOIDED, t.voided_at),
                (UNCOLLECTIBLE, t.marked_uncollectible_at),
            ]
            for name, when in found:
                if name is not None and when is not None:
                    milestones[name] = min(when, milestones.get(name, when))
            rank = _SNAPSHOT_RANK.get(event.status or "", _KIND_RANK.get(event.type, rank))
        picks = {
            name: Pick(value, rank, at, event.event_id)
            for name in FIELDS
            if (value := getattr(event, name)) is not None
        }
        refunds = _join_maps(
            (
                {r.refund_id: RefundRecord(r.refund_id, r.amount, r.status, at)}
                for r in event.refunds
            ),
            RefundRecord.join,
        )
        attempts = (
            {max(event.attempt or 1, 1): at} if event.type is EventKind.PAYMENT_FAILED else {}
        )
        disputes: dict[str, DisputeRecord] = {}
        if event.dispute is not None:
            d = event.dispute
            disputes[d.dispute_id] = DisputeRecord(d.dispute_id, d.status, d.closed)
        return cls(
            invoice_id=event.invoice_id,
            milestones=milestones,
            picks=picks,
            refunds=refunds,
            reported_refunded=event.amount_refunded or 0,
            failed_attempts=attempts,
            disputes=disputes,
        )

    def join(self, other: InvoiceState) -> InvoiceState:
        if other.invoice_id != self.invoice_id:
            raise ValueError(f"cannot join facts of {other.invoice_id} into {self.invoice_id}")
        return InvoiceState(
            invoice_id=self.invoice_id,
            milestones=_join_maps((self.milestones, other.milestones), min),
            picks=_join_maps((self.picks, other.picks), lambda a, b: max(a, b, key=_pick_order)),
            refunds=_join_maps((self.refunds, other.refunds), RefundRecord.join),
            reported_refunded=max(self.reported_refunded, other.reported_refunded),
            failed_attempts=_join_maps((self.failed_attempts, other.failed_attempts), min),
            disputes=_join_maps((self.disputes, other.disputes), DisputeRecord.join),
        )

    # -- the derived view ----------------------------------------------------------------

    @property
    def is_paid(self) -> bool:
        return PAID in self.milestones

    @property
    def is_settled(self) -> bool:
        """Paid or void: nothing is owed any more, so a failed attempt needs no notice."""
        return self.is_paid or VOIDED in self.milestones

    @computed_once
    def status(self) -> InvoiceStatus | None:
        m = self.milestones
        if self.is_paid:
            refunded = self.amount_refunded
            if refunded > 0:
                if refunded >= self.amount_paid:
                    return InvoiceStatus.REFUNDED
                return InvoiceStatus.PARTIALLY_REFUNDED
            return InvoiceStatus.PAID
        if VOIDED in m:
            return InvoiceStatus.VOID
        if UNCOLLECTIBLE in m:
            return InvoiceStatus.UNCOLLECTIBLE
        if FINALIZED in m:
            return InvoiceStatus.OPEN
        if CREATED in m:
            return InvoiceStatus.DRAFT
        return None

    @property
    def number(self) -> str | None:
        return self._text("number")

    @property
    def currency(self) -> str | None:
        return self._text("currency")

    @property
    def customer_email(self) -> str | None:
        return self._text("customer_email")

    @property
    def charge_id(self) -> str | None:
        return self._text("charge_id")

    @property
    def amount_due(self) -> int:
        return self._amount("amount_due") or 0

    @computed_once
    def amount_paid(self) -> int:
        paid = self._amount("amount_paid")
        # A sender that says "paid" without the amount paid it in full.
        if self.is_paid and not paid:
            return self.amount_due
        return paid or 0

    @computed_once
    def counted_refunds(self) -> tuple[RefundRecord, ...]:
        """Refunds returning money, oldest first (provider time, then id)."""
        live = (r for r in self.refunds.values() if r.counted)
        return tuple(sorted(live, key=lambda r: (r.first_seen_at, r.refund_id)))

    @property
    def applied_refunds(self) -> tuple[RefundRecord, ...]:
        return self.counted_refunds if self.is_paid else ()

    @property
    def held_refunds(self) -> tuple[RefundRecord, ...]:
        """Refunds known while the invoice is not known to be paid: recorded, not applied."""
        return () if self.is_paid else self.counted_refunds

    @computed_once
    def _refunded_total(self) -> int:
        # The by-id sum, or the provider's cumulative figure when its list was not expanded.
        return max(sum(r.amount for r in self.counted_refunds), self.reported_refunded)

    @property
    def amount_refunded(self) -> int:
        return self._refunded_total if self.is_paid else 0

    @property
    def held_amount(self) -> int:
        return 0 if self.is_paid else self._refunded_total

    @property
    def disputed(self) -> bool:
        return any(not d.closed for d in self.disputes.values())

    @computed_once
    def anomalies(self) -> tuple[str, ...]:
        """Facts a valid provider history cannot produce, kept and shown rather than dropped."""
        found: list[str] = []
        if self.is_paid and VOIDED in self.milestones:
            found.append(
                "reported both paid and void: the payment wins (a paid invoice cannot be voided)"
            )
        if self.is_paid and self._refunded_total > self.amount_paid:
            found.append(
                f"refunds total {self._refunded_total} exceeds amount paid {self.amount_paid}"
            )
        return tuple(found)

    def _text(self, name: str) -> str | None:
        pick = self.picks.get(name)
        return pick.value if pick is not None and isinstance(pick.value, str) else None

    def _amount(self, name: str) -> int | None:
        pick = self.picks.get(name)
        return pick.value if pick is not None and isinstance(pick.value, int) else None

    # -- storage -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe facts (the derived view is recomputed on load): `invoices.state`."""
        return {
            "version": STATE_VERSION,
            "invoice_id": self.invoice_id,
            "milestones": dict(sorted(self.milestones.items())),
            "picks": {
                name: {"value": p.value, "rank": p.rank, "at": p.at, "event_id": p.event_id}
                for name, p in sorted(self.picks.items())
            },
            "refunds": {
                rid: {"amount": r.amount, "status": r.status, "first_seen_at": r.first_seen_at}
                for rid, r in sorted(self.refunds.items())
            },
            "reported_refunded": self.reported_refunded,
            "failed_attempts": {str(n): at for n, at in sorted(self.failed_attempts.items())},
            "disputes": {
                did: {"status": d.status, "closed": d.closed}
                for did, d in sorted(self.disputes.items())
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InvoiceState:
        if data.get("version") != STATE_VERSION:
            raise ValueError(
                f"invoice state version {data.get('version')!r} is not {STATE_VERSION}: "
                "this billhook is older than the database; upgrade it"
            )
        try:
            return cls(
                invoice_id=str(data["invoice_id"]),
                milestones={k: float(v) for k, v in data["milestones"].items()},
                picks={
                    k: Pick(v["value"], int(v["rank"]), float(v["at"]), str(v["event_id"]))
                    for k, v in data["picks"].items()
                },
                refunds={
                    k: RefundRecord(
                        k, int(v["amount"]), str(v["status"]), float(v["first_seen_at"])
                    )
                    for k, v in data["refunds"].items()
                },
                reported_refunded=int(data["reported_refunded"]),
                failed_attempts={int(k): float(v) for k, v in data["failed_attempts"].items()},
                disputes={
                    k: DisputeRecord(k, str(v["status"]), bool(v["closed"]))
                    for k, v in data["disputes"].items()
                },
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(
                f"invoice state is not in the version {STATE_VERSION} shape: {exc!r}"
            ) from exc


def _pick_order(pick: Pick) -> tuple[int, float, str, str]:
    return pick.order


def _join_maps(maps: Iterable[Mapping[K, V]], combine: Callable[[V, V], V]) -> dict[K, V]:
    joined: dict[K, V] = {}
    for mapping in maps:
        for key, value in mapping.items():
            joined[key] = combine(joined[key], value) if key in joined else value
    return joined
