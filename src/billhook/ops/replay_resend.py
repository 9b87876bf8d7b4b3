"""`--resend-effects KIND`: the sent effects of one kind go back to pending, under the same key.

A replay never re-sends an effect on its own; this is the explicit way. The effects keep their
idempotency key (so the same Message-ID), and putting them back is an operator action of its
own, audited through `Perform` with their keys.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from billhook.ops.replay_diff import sent_effects
from billhook.store.engine import transaction
from billhook.store.schema import effects

T = TypeVar("T")


class Perform(Protocol):
    """The audit door an operator action goes through (see `ops.audit.perform`)."""

    def __call__(self, action: str, params: Mapping[str, Any], operation: Callable[[], T]) -> T: ...


def resend_sent_effects(
    engine: Engine,
    invoice_ids: Sequence[str],
    kind: str | None,
    *,
    perform: Perform,
    clock: Callable[[], float],
) -> tuple[str, ...]:
    """The keys put back to pending (none if `kind` is None), audited as `resend_effects`."""
    if kind is None:
        return ()
    with engine.connect() as connection:
        found = sent_effects(connection, invoice_ids, kind)
    keys = [key for per_invoice in found.values() for key in per_invoice]
    if not keys:
        return ()
    params = {"kind": kind, "invoice_ids": sorted(found), "idempotency_keys": keys}
    return perform(
        action="resend_effects", params=params, operation=lambda: _reset(engine, keys, clock)
    )


def _reset(engine: Engine, keys: Sequence[str], clock: Callable[[], float]) -> tuple[str, ...]:
    now = clock()
    reset: list[str] = []
    with transaction(engine) as connection:
        for start in range(0, len(keys), 500):
            reset += connection.execute(
                sa.update(effects)
                .where(
                    effects.c.idempotency_key.in_(list(keys[start : start + 500])),
                    effects.c.state == "sent",
                )
                .values(
                    state="pending",
                    attempts=0,
                    run_at=now,
                    lease_expires_at=None,
                    last_error=None,
                )
                .returning(effects.c.idempotency_key)
            ).scalars()
    return tuple(sorted(reset))
