"""Every SQLite connection billhook opens is set up for durability first, then for speed."""

from __future__ import annotations

from pathlib import Path

from billhook.store.engine import SQLITE_BUSY_TIMEOUT_MS, create_engine
from billhook.store.wal_checkpoints import WRITER_AUTOCHECKPOINT_PAGES
from billhook.store.write_turns import TurnTakingConnection


def test_a_connection_syncs_every_commit_and_keeps_scratch_work_in_memory(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'settings.db'}")
    try:
        with engine.connect() as connection:

            def pragma(name: str) -> object:
                return connection.exec_driver_sql(f"PRAGMA {name}").scalar_one()

            assert pragma("journal_mode") == "wal"
            assert pragma("synchronous") == 2  # FULL: the WAL is synced at every commit
            assert pragma("foreign_keys") == 1
            assert pragma("busy_timeout") == SQLITE_BUSY_TIMEOUT_MS
            assert pragma("temp_store") == 2  # MEMORY: no statement-journal files
            assert pragma("wal_autocheckpoint") == WRITER_AUTOCHECKPOINT_PAGES
            assert isinstance(connection.connection.dbapi_connection, TurnTakingConnection)
    finally:
        engine.dispose()
