"""`billhook dlq` shows dead jobs and dead effects side by side and redrives either, audited."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import orjson
import sqlalchemy as sa

from billhook.store.engine import create_engine, transaction
from billhook.store.schema import audit_log, effects, jobs


def _cli(database_url: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "BILLHOOK_DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "-m", "billhook", *args],
        env=env,
        capture_output=True,
        timeout=60,
        check=True,
    )


def test_dead_jobs_and_dead_effects_are_listed_and_redriven(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    now = time.time()
    with transaction(engine) as connection:
        job_id = connection.execute(
            jobs.insert()
            .values(
                ordering_key="in_1",
                order_ts=now,
                state="dead",
                attempts=3,
                max_attempts=3,
                run_at=now,
                created_at=now,
                finished_at=now,
                last_error="boom",
            )
            .returning(jobs.c.id)
        ).scalar_one()
        effect_id = connection.execute(
            effects.insert()
            .values(
                idempotency_key="refund_notice:in_1:re_1",
                kind="refund_notice",
                channel="email",
                invoice_id="in_1",
                payload="{}",
                state="dead",
                attempts=3,
                max_attempts=3,
                run_at=now,
                created_at=now,
                last_error="invoice in_1 has no customer_email",
            )
            .returning(effects.c.id)
        ).scalar_one()

    listed = orjson.loads(_cli(sqlite_url, "dlq", "list", "--json").stdout)
    kinds = {entry["kind"]: entry for entry in listed}
    assert kinds["process_event"]["job_id"] == job_id
    assert (kinds["effect"]["id"], kinds["effect"]["effect_kind"]) == (effect_id, "refund_notice")
    assert kinds["effect"]["last_error"] == "invoice in_1 has no customer_email"

    _cli(sqlite_url, "dlq", "redrive", "--effect", str(effect_id))
    with engine.connect() as connection:
        state, key = connection.execute(sa.select(effects.c.state, effects.c.idempotency_key)).one()
        job_state = connection.execute(sa.select(jobs.c.state)).scalar_one()
        actions = list(connection.execute(sa.select(audit_log.c.action)).scalars())
    assert (state, key, job_state) == ("pending", "refund_notice:in_1:re_1", "dead")
    assert actions == ["dlq.redrive_effect"]
    engine.dispose()
