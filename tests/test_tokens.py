"""Admin tokens and the audit door, on SQLite and PostgreSQL: hashed at rest, roles, revocation."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from billhook.cli import app
from billhook.errors import Forbidden, InvalidRequest, NotFound, Unauthorized
from billhook.ops.audit import cli_actor, list_audit, perform
from billhook.ops.tokens import (
    TOKEN_PREFIX,
    authenticate,
    create_token,
    list_tokens,
    revoke_token,
)
from billhook.store.engine import create_engine
from billhook.store.schema import api_tokens, audit_log


def _rows(engine: Engine, table: sa.Table) -> list[dict[str, object]]:
    with engine.connect() as connection:
        return [
            {str(k): v for k, v in r.items()}
            for r in connection.execute(sa.select(table)).mappings()
        ]


def test_a_token_is_shown_once_and_only_its_hash_is_stored(engine: Engine) -> None:
    token = create_token(engine, name="ci-bot", role="operator", actor="cli:test")

    assert token.startswith(TOKEN_PREFIX) and len(token) > 40
    (row,) = _rows(engine, api_tokens)
    assert row["token_hash"] == hashlib.sha256(token.encode()).hexdigest()
    assert token not in orjson.dumps(row, default=str).decode()
    listed = list_tokens(engine)
    assert [(t.name, t.role, t.revoked) for t in listed] == [("ci-bot", "operator", False)]
    assert not any("hash" in field for field in listed[0].__dataclass_fields__)


def test_authenticate_gives_the_principal_and_refuses_none_unknown_and_revoked(
    engine: Engine,
) -> None:
    viewer = create_token(engine, name="grafana", role="viewer", actor="cli:test")
    operator = create_token(engine, name="oncall", role="operator", actor="cli:test")

    assert authenticate(engine, viewer).name == "grafana"
    assert authenticate(engine, operator).role == "operator"
    for missing in (None, ""):
        with pytest.raises(Unauthorized, match="Authorization: Bearer"):
            authenticate(engine, missing)
    with pytest.raises(Unauthorized, match="not known"):
        authenticate(engine, viewer + "x")
    with pytest.raises(Unauthorized, match="not known"):
        authenticate(engine, hashlib.sha256(viewer.encode()).hexdigest())  # the hash is no key

    revoke_token(engine, name="grafana", actor="cli:test")
    with pytest.raises(Unauthorized, match="revoked"):
        authenticate(engine, viewer)
    assert authenticate(engine, operator).name == "oncall"  # others unaffected


def test_roles_an_operator_does_what_a_viewer_does_not(engine: Engine) -> None:
    viewer = authenticate(engine, create_token(engine, name="v", role="viewer", actor="t"))
    operator = authenticate(engine, create_token(engine, name="o", role="operator", actor="t"))

    viewer.require("viewer")
    operator.require("viewer")
    operator.require("operator")
    with pytest.raises(Forbidden, match="--role operator"):
        viewer.require("operator")


@pytest.mark.parametrize(
    ("name", "role", "error"),
    [
        ("ok", "admin", "role must be one of"),
        ("", "viewer", "token name"),
        (" padded", "viewer", "token name"),
        ("x" * 129, "viewer", "token name"),
        ("cli:root", "operator", "may not start with 'cli:'"),
    ],
)
def test_invalid_tokens_are_refused_and_the_attempt_audited(
    sqlite_url: str, name: str, role: str, error: str
) -> None:
    engine = create_engine(sqlite_url)
    with pytest.raises(InvalidRequest, match=error):
        create_token(engine, name=name, role=role, actor="cli:test")
    assert _rows(engine, api_tokens) == []
    (entry,) = list_audit(engine)
    assert entry.action == "token.create" and entry.outcome.startswith("refused: InvalidRequest")
    engine.dispose()


def test_names_are_unique_even_after_revoke_and_revoke_is_idempotent(engine: Engine) -> None:
    create_token(engine, name="deploy", role="viewer", actor="cli:test")
    first = revoke_token(engine, name="deploy", actor="cli:test")
    again = revoke_token(engine, name="deploy", actor="cli:test")
    assert first.revoked_at is not None and again.revoked_at == first.revoked_at
    with pytest.raises(InvalidRequest, match="already exists"):
        create_token(engine, name="deploy", role="viewer", actor="cli:test")
    with pytest.raises(NotFound, match="token list"):
        revoke_token(engine, name="nobody", actor="cli:test")

    trail = [(e.action, e.params, e.outcome.split(":")[0]) for e in reversed(list_audit(engine))]
    assert trail == [
        ("token.create", {"name": "deploy", "role": "viewer"}, "ok"),
        ("token.revoke", {"name": "deploy"}, "ok"),
        ("token.revoke", {"name": "deploy"}, "ok"),
        ("token.create", {"name": "deploy", "role": "viewer"}, "refused"),
        ("token.revoke", {"name": "nobody"}, "refused"),
    ]
    assert {e.actor for e in list_audit(engine)} == {"cli:test"}


def test_perform_writes_the_attempt_first_and_the_outcome_after(engine: Engine) -> None:
    seen: list[str] = []

    def _action() -> int:
        # The row exists while the action runs: a crash here still leaves a trace.
        seen.append(list_audit(engine)[0].outcome)
        return 7

    assert perform(engine, actor="a", action="x", params={"n": 1}, operation=_action) == 7
    assert seen == ["started"]

    def _boom() -> None:
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        perform(engine, actor="a", action="y", params={}, operation=_boom, now=lambda: 5.0)
    newest, oldest = list_audit(engine)
    assert (newest.at, newest.outcome) == (5.0, "failed: RuntimeError: disk on fire")
    assert (oldest.params, oldest.outcome) == ({"n": 1}, "ok")
    assert [e.action for e in list_audit(engine, action="x")] == ["x"]
    assert [e.id for e in list_audit(engine, limit=1, before_id=newest.id)] == [oldest.id]
    assert cli_actor().startswith("cli:")
    assert len(_rows(engine, audit_log)) == 2


def test_the_cli_prints_the_token_alone_lists_revokes_and_audits(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"BILLHOOK_DATABASE_URL": sqlite_url, "BILLHOOK_DATA_DIR": str(tmp_path)}

    def billhook(*args: str) -> subprocess.CompletedProcess[str]:
        # Real processes for the commands that act (and log): stdout must carry only the token.
        return subprocess.run(
            [sys.executable, "-m", "billhook", *args],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=120,
        )

    created = billhook("token", "create", "--role", "operator", "--name", "oc")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith(TOKEN_PREFIX) and "\n" not in token  # `$(billhook token create)`
    assert "shown only now" in created.stderr
    assert billhook("token", "revoke", "oc").returncode == 0

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    runner = CliRunner()  # in-process for the reads
    listed = runner.invoke(app, ["token", "list", "--json"])
    assert orjson.loads(listed.stdout)[0]["name"] == "oc"
    assert orjson.loads(listed.stdout)[0]["revoked_at"] is not None
    assert token not in listed.stdout and "hash" not in listed.stdout
    assert "oc" in runner.invoke(app, ["token", "list"]).stdout

    engine = create_engine(sqlite_url)
    with pytest.raises(Unauthorized, match="revoked"):
        authenticate(engine, token)
    engine.dispose()

    trail = orjson.loads(runner.invoke(app, ["audit", "--json"]).stdout)
    assert [(e["action"], e["outcome"]) for e in trail] == [
        ("token.revoke", "ok"),
        ("token.create", "ok"),
    ]
    assert all(e["actor"].startswith("cli:") for e in trail)
    assert "token.create" in runner.invoke(app, ["audit"]).stdout
