"""The store goes away: 503 with a detail (the provider retries), /readyz 503, then recovery."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from billhook.api.app import create_app
from billhook.store.engine import create_engine
from billhook.store.migrate import upgrade
from live_server import running_app, running_process
from test_ingest_http import STRIPE_SECRET, counts, make_settings, stripe_headers

PG_ADMIN_URL = os.environ.get(
    "BILLHOOK_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


@contextmanager
def _admin() -> Iterator[sa.Connection]:
    engine = sa.create_engine(
        PG_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://", 1),
        isolation_level="AUTOCOMMIT",
        poolclass=sa.pool.NullPool,
    )
    try:
        with engine.connect() as connection:
            yield connection
    finally:
        engine.dispose()


def _database_name(url: str) -> str:
    return url.rpartition("/")[2]


def _post(base_url: str, event_id: str) -> httpx.Response:
    body = json.dumps({"id": event_id, "type": "invoice.paid"}).encode()
    return httpx.post(base_url + "/webhooks/stripe", content=body, headers=stripe_headers(body))


def _wait_for(predicate: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def _assert_unavailable(base_url: str, event_id: str) -> None:
    response = _post(base_url, event_id)
    assert response.status_code == 503, response.text
    assert "database" in response.json()["detail"]
    assert response.headers["retry-after"]
    ready = httpx.get(base_url + "/readyz")
    assert ready.status_code == 503
    assert "BILLHOOK_DATABASE_URL" in ready.json()["detail"]
    assert httpx.get(base_url + "/healthz").status_code == 200


@pytest.mark.postgres
def test_serve_starts_without_its_postgres_database_and_recovers(
    pg_template: str, tmp_path: Path
) -> None:
    name = f"billhook_t_{uuid.uuid4().hex[:12]}"
    url = f"{PG_ADMIN_URL.rpartition('/')[0]}/{name}"
    env = {
        "BILLHOOK_DATABASE_URL": url,
        "BILLHOOK_STRIPE_WEBHOOK_SECRETS": STRIPE_SECRET,
        "BILLHOOK_DATA_DIR": str(tmp_path / "data"),
        "BILLHOOK_LOG_FORMAT": "json",
    }
    try:
        with running_process(["serve"], env=env, log_path=tmp_path / "serve.log") as server:
            _assert_unavailable(server.base_url, "evt_early")
            with _admin() as admin:
                admin.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
            _wait_for(lambda: httpx.get(server.base_url + "/readyz").status_code == 200)
            response = _post(server.base_url, "evt_early")  # the provider's retry
            assert response.status_code == 200 and response.json()["status"] == "accepted"
            assert server.process.poll() is None
        assert counts(url) == (1, 1, 1)
        assert any(
            line.startswith("{") and json.loads(line).get("outcome") == "store_unavailable"
            for line in server.output().splitlines()
        )
    finally:
        with _admin() as admin:
            admin.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.postgres
def test_postgres_outage_while_serving(postgres_url: str, tmp_path: Path) -> None:
    name = _database_name(postgres_url)
    away = name + "_away"
    with running_app(create_app(make_settings(postgres_url, tmp_path))) as base_url:
        assert _post(base_url, "evt_before").status_code == 200
        with _admin() as admin:
            admin.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
            )
            admin.exec_driver_sql(f'ALTER DATABASE "{name}" RENAME TO "{away}"')
        try:
            _assert_unavailable(base_url, "evt_during")
        finally:
            with _admin() as admin:
                admin.exec_driver_sql(f'ALTER DATABASE "{away}" RENAME TO "{name}"')
        _wait_for(lambda: httpx.get(base_url + "/readyz").status_code == 200)
        response = _post(base_url, "evt_during")
        assert response.status_code == 200 and response.json()["status"] == "accepted"
    assert counts(postgres_url) == (2, 2, 2)


def test_sqlite_unreachable_then_created(tmp_path: Path) -> None:
    database = tmp_path / "not-yet" / "billhook.db"
    url = f"sqlite:///{database}"
    with running_app(create_app(make_settings(url, tmp_path))) as base_url:
        _assert_unavailable(base_url, "evt_sqlite")
        database.parent.mkdir()
        engine = create_engine(url)
        upgrade(engine)
        engine.dispose()
        _wait_for(lambda: httpx.get(base_url + "/readyz").status_code == 200)
        assert _post(base_url, "evt_sqlite").json()["status"] == "accepted"
    assert counts(url) == (1, 1, 1)


def test_readyz_says_to_migrate(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    with running_app(create_app(make_settings(url, tmp_path))) as base_url:
        ready = httpx.get(base_url + "/readyz")
    assert ready.status_code == 503
    assert "billhook migrate" in ready.json()["detail"]
