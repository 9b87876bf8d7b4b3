"""One module per sender: its signature scheme, its envelope, and the ordering key of its events.

Each source turns a signed raw delivery into an `IncomingEvent` (or raises a `WebhookRejected`
saying which check failed); everything past the envelope is processing's job.
"""

from __future__ import annotations

from dataclasses import dataclass

from billhook.errors import MalformedPayload

MAX_ID_LENGTH = 255  # the width of the id, type and ordering key columns


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


def bounded(value: str, what: str) -> str:
    """Refuse an id the store could not hold, before it becomes a 503 the sender retries forever."""
    if len(value) > MAX_ID_LENGTH:
        raise MalformedPayload(f"{what} is over {MAX_ID_LENGTH} characters: send a shorter one")
    return value


__all__ = ["MAX_ID_LENGTH", "IncomingEvent", "bounded"]
