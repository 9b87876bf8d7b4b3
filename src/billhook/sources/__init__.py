"""One module per sender: its signature scheme, its envelope, and the ordering key of its events.

Each source turns a signed raw delivery into an `IncomingEvent` (or raises a `WebhookRejected`
saying which check failed); everything past the envelope is processing's job.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class IncomingEvent:
    """A verified delivery, ready to be stored: what ingest knows about it, nothing more."""

    source: str
    event_id: str
    type: str
    ordering_key: str
    occurred_at: float | None
    headers: dict[str, str]
    body: bytes


__all__ = ["IncomingEvent"]
