"""`POST /api/v1/replay` over real HTTP on SQLite and PostgreSQL: a viewer is refused and nothing
changes; an operator's dry run (the default) writes nothing; a real replay is audited by name."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
from sqlalchemy.engine import Engine

from billhook.api.app import create_app
from billhook.config import load_settings
from billhook.ops.tokens import create_token
from live_server import running_app
from test_replay import E1, E2, E3, INVOICE, audit_rows, checksums, invoice, process, store


@dataclass(frozen=True)
class Api:
    base_url: str
    viewer: dict[str, str]
    operator: dict[str, str]


@pytest.fixture
def api(engine: Engine, tmp_path: Path) -> Iterator[Api]:
    store(engine, E1, E2, E3)
    process(engine, "e1", "e2")
    tokens = {
        role: create_token(engine, name=f"{role}-token", role=role, actor="cli:test")
        for role in ("viewer", "operator")
    }
    settings = load_settings(database_url=str(engine.url), data_dir=str(tmp_path))
    with running_app(create_app(settings, engine)) as base_url:
        yield Api(
            base_url,
            {"Authorization": f"Bearer {tokens['viewer']}"},
            {"Authorization": f"Bearer {tokens['operator']}"},
        )


def test_replay_route_by_role(api: Api, engine: Engine) -> None:
    url = f"{api.base_url}/api/v1/replay"
    everything = {"by": "filter", "since": 0}
    with httpx.Client(timeout=30) as client:
        before = checksums(engine)
        refused = client.post(url, json={**everything, "dry_run": False}, headers=api.viewer)
        assert refused.status_code == 403 and "--role operator" in refused.json()["detail"]
        assert client.post(url, json=everything).status_code == 401
        assert checksums(engine) == before

        dry = client.post(url, json=everything, headers=api.operator)
        assert dry.status_code == 200, dry.text
        assert checksums(engine) == before  # a dry run writes nothing, not even an audit row
        body = dry.json()
        assert (body["dry_run"], body["changed"], body["events"]) == (True, True, 3)
        [diff] = body["diffs"]
        assert {"field": "status", "before": "paid", "after": "partially_refunded"} in diff[
            "changes"
        ]

        done = client.post(
            url,
            json={"by": "invoice", "invoice_id": INVOICE, "dry_run": False},
            headers=api.operator,
        )
        assert done.status_code == 200, done.text
        assert (done.json()["applied"], done.json()["failed"]) == (3, [])
        assert invoice(engine).status == "partially_refunded"
        [entry] = audit_rows(engine, "replay")
        assert entry["actor"] == "operator-token"
        assert entry["outcome"].startswith("ok: ") and "3 applied" in entry["outcome"]
        assert orjson.loads(entry["params"])["invoice_id"] == INVOICE

        missing = client.post(
            url, json={"by": "events", "event_ids": ["evt_nope"]}, headers=api.operator
        )
        assert missing.status_code == 404 and "evt_nope" in missing.json()["detail"]
        mixed = client.post(
            url, json={"by": "events", "event_ids": ["e1"], "rebuild": True}, headers=api.operator
        )
        assert mixed.status_code == 422  # rebuild belongs to the invoice shape only
