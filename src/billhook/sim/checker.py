"""The invariant checks: generator truth + what was observed -> a report. Pure, no I/O.

Violations (any one fails the run): an acknowledged event that is not stored, an event never
acknowledged, a wrong final state, a missing required effect, an effect delivered under two
different keys, an effect nobody expected. Resends under the same key and dead letters are
reported, not violations (DESIGN invariant 2 allows the first, invariant 1 the second).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from billhook.sim.histories import History, InvoiceTruth

STATE_FIELDS = ("status", "currency", "amount_due", "amount_paid", "amount_refunded", "disputed")


@dataclass(frozen=True)
class ObservedEmail:
    """One message the sink received; `kind`/`invoice_id`/`ref` come from `classify_email`."""

    message_id: str | None
    kind: str | None
    invoice_id: str | None
    ref: str
    subject: str
    received_at: float = 0.0


@dataclass(frozen=True)
class DeadLetter:
    kind: str
    subject: str
    reason: str


@dataclass(frozen=True)
class DeliveryStats:
    """What the fake provider did: every HTTP attempt, and which events got a 2xx."""

    attempts: int
    acknowledged: int
    statuses: Mapping[str, int]
    acked_event_ids: frozenset[str]
    duplicates_sent: int = 0


@dataclass(frozen=True)
class Observation:
    deliveries: DeliveryStats
    invoices: Mapping[str, Mapping[str, Any] | None]
    emails: Sequence[ObservedEmail]
    # None when the target does not expose its store (a foreign receiver under --target).
    stored_event_ids: frozenset[str] | None = None
    dead_letters: Sequence[DeadLetter] = ()
    converge_seconds: float | None = None
    crashes: int = 0
    notes: Sequence[str] = ()


@dataclass(frozen=True)
class Violation:
    invariant: str
    subject: str
    detail: str


@dataclass(frozen=True)
class Report:
    invoices: int
    events: int
    deliveries_sent: int
    acknowledged: int
    statuses: Mapping[str, int]
    events_stored: int | None
    acked_not_stored: int | None
    never_acknowledged: int
    wrong_states: int
    missing_effects: int
    duplicate_effects: int
    unexpected_effects: int
    resends: int
    emails: int
    dead_letters: Sequence[DeadLetter]
    converge_seconds: float | None
    crashes: int
    violations: Sequence[Violation] = field(default_factory=tuple)
    notes: Sequence[str] = ()

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "invoices": self.invoices,
            "events": self.events,
            "deliveries_sent": self.deliveries_sent,
            "acknowledged_2xx": self.acknowledged,
            "statuses": dict(self.statuses),
            "events_stored": self.events_stored,
            "acked_not_stored": self.acked_not_stored,
            "never_acknowledged": self.never_acknowledged,
            "wrong_states": self.wrong_states,
            "missing_effects": self.missing_effects,
            "duplicate_effects": self.duplicate_effects,
            "unexpected_effects": self.unexpected_effects,
            "resends_same_key": self.resends,
            "emails": self.emails,
            "dead_letters": [vars(d) for d in self.dead_letters],
            "converge_seconds": self.converge_seconds,
            "worker_crashes": self.crashes,
            "violations": [vars(v) for v in self.violations],
            "notes": list(self.notes),
        }


def check(histories: Sequence[History], observed: Observation) -> Report:
    violations: list[Violation] = []
    all_event_ids = {e.event_id for h in histories for e in h.events}

    acked = observed.deliveries.acked_event_ids
    never = sorted(all_event_ids - acked)
    violations += [
        Violation("never_acknowledged", event_id, "no delivery of it ever got a 2xx")
        for event_id in never
    ]
    stored_count: int | None = None
    acked_not_stored: int | None = None
    if observed.stored_event_ids is not None:
        stored = observed.stored_event_ids & all_event_ids
        stored_count = len(stored)
        lost = sorted(acked - observed.stored_event_ids)
        acked_not_stored = len(lost)
        violations += [
            Violation("acked_not_stored", event_id, "got a 2xx but is not in the store")
            for event_id in lost
        ]

    state_violations = [
        v
        for h in histories
        for v in state_differences(h.truth, observed.invoices.get(h.invoice_id))
    ]
    violations += state_violations

    effect_violations, resends = _effects(histories, observed.emails)
    violations += effect_violations
    counts: dict[str, int] = defaultdict(int)
    for v in violations:
        counts[v.invariant] += 1
    wrong_invoices = {v.subject for v in state_violations}
    return Report(
        invoices=len(histories),
        events=len(all_event_ids),
        deliveries_sent=observed.deliveries.attempts,
        acknowledged=observed.deliveries.acknowledged,
        statuses=dict(observed.deliveries.statuses),
        events_stored=stored_count,
        acked_not_stored=acked_not_stored,
        never_acknowledged=len(never),
        wrong_states=len(wrong_invoices),
        missing_effects=counts["missing_effect"],
        duplicate_effects=counts["duplicate_effect"],
        unexpected_effects=counts["unexpected_effect"],
        resends=resends,
        emails=len(observed.emails),
        dead_letters=tuple(observed.dead_letters),
        converge_seconds=observed.converge_seconds,
        crashes=observed.crashes,
        violations=tuple(violations),
        notes=tuple(observed.notes),
    )


def state_differences(truth: InvoiceTruth, seen: Mapping[str, Any] | None) -> list[Violation]:
    """Field by field; a field the receiver does not expose (e.g. `disputed`) is not judged."""
    if seen is None:
        return [Violation("wrong_state", truth.invoice_id, f"not found; expected {truth.status}")]
    wrong = [
        f"{name}={seen[name]!r} (expected {getattr(truth, name)!r})"
        for name in STATE_FIELDS
        if name in seen and _normal(seen[name]) != _normal(getattr(truth, name))
    ]
    if not wrong:
        return []
    return [Violation("wrong_state", truth.invoice_id, ", ".join(wrong))]


def converged(histories: Sequence[History], observed: Observation) -> bool:
    """True when states and required effects are all there: the runner polls on this."""
    if any(state_differences(h.truth, observed.invoices.get(h.invoice_id)) for h in histories):
        return False
    missing, _ = _effects(histories, observed.emails)
    return not any(v.invariant == "missing_effect" for v in missing)


def _normal(value: Any) -> Any:
    if isinstance(value, str):
        return value.lower()
    if isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _effects(
    histories: Sequence[History], emails: Sequence[ObservedEmail]
) -> tuple[list[Violation], int]:
    expected = {e.key: e for h in histories for e in h.effects}
    by_key: dict[tuple[str, str, str], list[ObservedEmail]] = defaultdict(list)
    violations: list[Violation] = []
    for index, email in enumerate(emails):
        if email.kind is None or email.invoice_id is None:
            violations.append(
                Violation(
                    "unexpected_effect",
                    email.message_id or f"email#{index}",
                    f"cannot tell which effect this is: {email.subject!r}",
                )
            )
            continue
        by_key[(email.kind, email.invoice_id, email.ref)].append(email)

    resends = 0
    for key, group in sorted(by_key.items()):
        label = "/".join(part for part in key if part)
        if key not in expected:
            violations.append(
                Violation("unexpected_effect", label, f"{len(group)} email(s) nobody expected")
            )
            continue
        # A missing Message-ID cannot prove a resend: each such email counts as its own key.
        ids = [e.message_id or f"<none#{i}>" for i, e in enumerate(group)]
        distinct = set(ids)
        resends += len(ids) - len(distinct)
        if len(distinct) > 1:
            violations.append(
                Violation(
                    "duplicate_effect",
                    label,
                    f"{len(group)} emails under {len(distinct)} different Message-IDs",
                )
            )
    for key, effect in sorted(expected.items()):
        if effect.required and key not in by_key:
            label = "/".join(part for part in key if part)
            violations.append(Violation("missing_effect", label, "no email received"))
    return violations, resends
