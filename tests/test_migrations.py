"""The schema that migrations build equals the schema the code declares, on both databases."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Engine

from billhook.store.migrate import head_revision, is_current, upgrade, upgrade_sql
from billhook.store.schema import metadata


def test_migrations_build_the_declared_schema(engine: Engine) -> None:
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), metadata)
    assert differences == []
    assert is_current(engine)


def test_upgrade_is_idempotent(engine: Engine) -> None:
    upgrade(engine)
    assert is_current(engine)


def test_offline_sql_names_every_table() -> None:
    sql = upgrade_sql("postgresql://localhost/x")
    for table in metadata.tables:
        assert f"CREATE TABLE {table}" in sql
    assert head_revision() in sql
