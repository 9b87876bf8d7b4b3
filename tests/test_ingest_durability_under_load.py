"""A 2xx means durably stored, even when the server is SIGKILLed in the middle of a load.

`billhook serve` runs in its own process group (two server processes on PostgreSQL, one on
SQLite: the configurations the benchmark measures), a bounded async client keeps 24 signed
deliveries in flight, and the whole group is SIGKILLed while they run. After a restart on the
same database, every event that got a 2xx is in the store, once, with one job.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import orjson
import pytest
import sqlalchemy as sa
import stripe as stripe_sdk

from billhook.store.engine import create_engine
from live_server import free_port

SECRET = "whsec_durability_under_load"
IN_FLIGHT = 24
LOAD_BEFORE_KILL_S = 2.0
STARTUP_TIMEOUT_S = 60.0

pytestmark = pytest.mark.slow


@contextmanager
def _serve(database_url: str, tmp_path: Path, processes: int) -> Iterator[tuple[str, int]]:
    port = free_port()
    env = {
        **os.environ,
        "BILLHOOK_DATABASE_URL": database_url,
        "BILLHOOK_STRIPE_WEBHOOK_SECRETS": SECRET,
        "BILLHOOK_DATA_DIR": str(tmp_path / "data"),
        "BILLHOOK_LOG_FORMAT": "json",
        "BILLHOOK_LOG_LEVEL": "warning",
    }
    command = [sys.executable, "-m", "billhook", "serve", "--host", "127.0.0.1",
               "--port", str(port), "--processes", str(processes)]
    with (tmp_path / f"serve-{port}.log").open("wb") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert process.poll() is None, "billhook serve exited during start-up"
            try:
                if httpx.get(base_url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "billhook serve did not become ready"
            time.sleep(0.05)
        yield base_url, process.pid
    finally:
        # The whole group: after a SIGKILL of the parent this is a no-op, otherwise a cleanup.
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _delivery() -> tuple[str, bytes, dict[str, str]]:
    event_id = f"evt_{uuid.uuid4().hex}"
    invoice_id = f"in_{uuid.uuid4().hex[:24]}"
    body = orjson.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": "invoice.paid",
            "created": int(time.time()),
            "data": {"object": {"id": invoice_id, "object": "invoice", "amount_paid": 4200,
                                "currency": "eur", "status": "paid", "filler": "x" * 1500}},
        }
    )
    header = stripe_sdk.WebhookSignature.generate_signature_header(
        body.decode(), SECRET, timestamp=int(time.time())
    )
    return event_id, body, {"Stripe-Signature": header, "Content-Type": "application/json"}


async def _load_until_killed(base_url: str, group: int) -> tuple[set[str], int]:
    """Send deliveries until the server dies; return the acknowledged ids and the 2xx count."""
    acknowledged: set[str] = set()
    stop = asyncio.Event()

    async def client(http: httpx.AsyncClient) -> None:
        while not stop.is_set():
            event_id, body, headers = _delivery()
            try:
                response = await http.post("/webhooks/stripe", content=body, headers=headers)
            except httpx.TransportError:
                continue  # refused or cut by the kill: no 2xx, no promise
            if 200 <= response.status_code < 300:
                assert response.json() == {"status": "accepted", "event_id": event_id}
                acknowledged.add(event_id)

    async def killer() -> None:
        deadline = time.monotonic() + 20
        await asyncio.sleep(LOAD_BEFORE_KILL_S)
        while len(acknowledged) < 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        os.killpg(group, signal.SIGKILL)  # mid-load: deliveries are in flight and in commits
        await asyncio.sleep(0.5)  # let the in-flight requests fail
        stop.set()

    limits = httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=5) as http:
        await asyncio.gather(killer(), *(client(http) for _ in range(IN_FLIGHT)))
    return acknowledged, len(acknowledged)


def _stored(database_url: str) -> tuple[dict[str, int], dict[int, int], int]:
    engine = create_engine(database_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            events = {
                str(row.event_id): int(row.id)
                for row in connection.execute(sa.text("SELECT id, event_id FROM events"))
            }
            jobs_per_event = {
                int(row.event_pk): int(row.n)
                for row in connection.execute(
                    sa.text("SELECT event_pk, count(*) AS n FROM jobs GROUP BY event_pk")
                )
            }
            rows = connection.execute(sa.text("SELECT count(*) FROM events")).scalar_one()
        return events, jobs_per_event, int(rows)
    finally:
        engine.dispose()


def test_every_acknowledged_event_survives_sigkill_under_load(
    database_url: str, tmp_path: Path
) -> None:
    processes = 1 if database_url.startswith("sqlite") else 2
    with _serve(database_url, tmp_path, processes) as (base_url, group):
        acknowledged, count = asyncio.run(_load_until_killed(base_url, group))
    assert count >= 200, f"the load was too light to prove anything ({count} 2xx)"

    with _serve(database_url, tmp_path, processes) as (base_url, _group):
        events, jobs_per_event, rows = _stored(database_url)
        missing = acknowledged - events.keys()
        assert not missing, f"{len(missing)} of {count} acknowledged events were lost"
        assert rows == len(events), "an event is stored twice"
        assert all(jobs_per_event.get(events[e]) == 1 for e in acknowledged), "job count != 1"
        # The restarted server sees them too: a re-delivery is a duplicate, not a new event.
        again = next(iter(acknowledged))
        body = orjson.dumps({"id": again, "object": "event", "type": "invoice.paid",
                             "created": int(time.time()), "data": {"object": {}}})
        header = stripe_sdk.WebhookSignature.generate_signature_header(
            body.decode(), SECRET, timestamp=int(time.time())
        )
        response = httpx.post(
            base_url + "/webhooks/stripe",
            content=body,
            headers={"Stripe-Signature": header, "Content-Type": "application/json"},
        )
        assert response.json() == {"status": "duplicate", "event_id": again}
