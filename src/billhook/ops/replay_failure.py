"""`EventFailure`: a stored event a replay, its preview or a rebuild could not apply, and why."""

from __future__ import annotations

from dataclasses import dataclass

from billhook.ops.replay_selection import StoredEvent


@dataclass(frozen=True)
class EventFailure:
    event_id: str
    source: str
    error: str


def event_failure(stored: StoredEvent, exc: Exception) -> EventFailure:
    return EventFailure(stored.event_id, stored.source, f"{type(exc).__name__}: {exc}")
