"""The WAL checkpointer copies committed pages into the SQLite database file, off the writer."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from billhook.store.engine import create_engine
from billhook.store.wal_checkpoints import (
    WRITER_AUTOCHECKPOINT_PAGES,
    WalCheckpointer,
    checkpointer_for,
)


def _writer(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute(f"PRAGMA wal_autocheckpoint={WRITER_AUTOCHECKPOINT_PAGES}")
    connection.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB)")
    return connection


def _commit_pages(connection: sqlite3.Connection, commits: int) -> None:
    for _ in range(commits):
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany("INSERT INTO t (body) VALUES (?)", [(b"x" * 3000,)] * 20)
        connection.execute("COMMIT")


def _frames_not_yet_copied(path: Path) -> int:
    probe = sqlite3.connect(path, isolation_level=None)
    try:
        # A PASSIVE checkpoint with nothing left to copy reports log == checkpointed frames.
        _busy, log, copied = probe.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    finally:
        probe.close()
    return int(log) - int(copied)


def test_the_writer_alone_leaves_its_pages_in_the_wal(tmp_path: Path) -> None:
    """Past SQLite's default threshold (1,000 pages), the writer's raised one copies nothing."""
    path = tmp_path / "alone.db"
    writer = _writer(path)
    _commit_pages(writer, 80)  # ~4.8 MB, ~1,200 pages
    assert path.stat().st_size < 100_000
    assert _frames_not_yet_copied(path) == 0  # the probe's own checkpoint copies them
    assert path.stat().st_size > 4_000_000
    writer.close()


def test_commits_are_copied_into_the_database_file_soon_after(tmp_path: Path) -> None:
    path = tmp_path / "checkpointed.db"
    writer = _writer(path)
    checkpointer = WalCheckpointer(str(path), interval=0.01)
    try:
        _commit_pages(writer, 20)
        checkpointer.committed()
        deadline = time.monotonic() + 5
        while path.stat().st_size < 1_000_000 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert path.stat().st_size >= 1_000_000  # 400 rows of 3 KB now in the database file
        assert _frames_not_yet_copied(path) == 0
        rows = sqlite3.connect(path).execute("SELECT count(*) FROM t").fetchone()[0]
        assert rows == 400
    finally:
        checkpointer.close()
        writer.close()


def test_close_returns_even_when_asked_during_the_wait_between_checkpoints(
    tmp_path: Path,
) -> None:
    path = tmp_path / "closing.db"
    writer = _writer(path)
    _commit_pages(writer, 1)
    for _ in range(20):
        checkpointer = WalCheckpointer(str(path), interval=0.005)
        checkpointer.committed()
        time.sleep(0.002)  # close while the thread sleeps before its checkpoint
        closer = threading.Thread(target=checkpointer.close)
        closer.start()
        closer.join(timeout=5)
        assert not closer.is_alive(), "close() hung waiting for the checkpointer thread"
    writer.close()


def test_a_missing_database_file_is_never_created(tmp_path: Path) -> None:
    path = tmp_path / "absent.db"
    checkpointer = WalCheckpointer(str(path), interval=0.001)
    checkpointer.committed()
    time.sleep(0.05)
    checkpointer.close()
    assert not path.exists()


def test_the_thread_ends_when_commits_stop_and_starts_again_with_the_next(tmp_path: Path) -> None:
    path = tmp_path / "idle.db"
    writer = _writer(path)
    checkpointer = WalCheckpointer(str(path), interval=0.001, idle_exit=0.05)
    try:
        _commit_pages(writer, 1)
        checkpointer.committed()
        assert checkpointer.running
        deadline = time.monotonic() + 5
        while checkpointer.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not checkpointer.running  # idle: no thread, no connection left on the file
        _commit_pages(writer, 20)
        checkpointer.committed()
        assert checkpointer.running
        while _frames_not_yet_copied(path) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sqlite3.connect(path).execute("SELECT count(*) FROM t").fetchone()[0] == 420
        assert path.stat().st_size >= 1_000_000  # the second round reached the database file
    finally:
        checkpointer.close()
        writer.close()


def test_an_engines_commits_are_checkpointed_by_its_process_checkpointer(tmp_path: Path) -> None:
    """billhook's engines raise SQLite's threshold and hand checkpoints to `checkpointer_for`:
    the database file grows although no commit came near the threshold."""
    path = tmp_path / "engine.db"
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.begin() as connection:
            threshold = connection.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one()
            connection.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB)")
        assert threshold == WRITER_AUTOCHECKPOINT_PAGES
        for _ in range(200):
            with engine.begin() as connection:
                connection.exec_driver_sql(
                    "INSERT INTO t (body) SELECT zeroblob(3000) FROM (SELECT 1 UNION ALL SELECT 2)"
                )
        assert checkpointer_for(str(path)).running
        deadline = time.monotonic() + 5
        while path.stat().st_size < 1_000_000 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert path.stat().st_size >= 1_000_000  # 400 rows of 3 KB, copied out of the WAL
    finally:
        engine.dispose()
        checkpointer_for(str(path)).close()


def test_checkpointers_of_one_file_share_one_rate(tmp_path: Path) -> None:
    """Three checkpointers (as in three processes) on one file, commits for a second: about one
    checkpoint per interval in all (each alone would run one per interval: ~50 in all)."""
    path = tmp_path / "shared.db"
    writer = _writer(path)
    checkpointers = [WalCheckpointer(str(path), interval=0.05) for _ in range(3)]
    try:
        commits = 0
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            _commit_pages(writer, 1)
            checkpointers[commits % 3].committed()
            commits += 1
            time.sleep(0.002)
    finally:
        for checkpointer in checkpointers:
            checkpointer.close()
        writer.close()
    ran = sum(checkpointer.checkpoints for checkpointer in checkpointers)
    assert 1 <= ran <= 32, f"{ran} checkpoints in one second at one per 50 ms"
    assert path.stat().st_size > 1_000_000  # and they did copy the commits into the file
