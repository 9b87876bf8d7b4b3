"""SQLite writers on one database file take turns in the kernel, not in SQLite's busy naps.

Two engines behave like two processes here: flock locks belong to the open file, and every
connection opens its own.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from billhook.store.engine import create_engine


def _flocks_on(path: Path) -> dict[str, int]:
    """Granted and waiting flock locks on `path`, from /proc/locks (waiters start with `->`)."""
    stat = os.stat(path)
    inode = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    found = {"granted": 0, "waiting": 0}
    deadline = time.monotonic() + 5
    while True:
        found = {"granted": 0, "waiting": 0}
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            waiting = fields[1] == "->"
            kind, where = (fields[2], fields[6]) if waiting else (fields[1], fields[5])
            if kind == "FLOCK" and where == inode:
                found["waiting" if waiting else "granted"] += 1
        if found["waiting"] or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def _begin_in_thread(engine: sa.Engine, began: threading.Event, done: threading.Event) -> None:
    with engine.begin() as connection:
        began.set()
        connection.exec_driver_sql("SELECT 1")
    done.set()


def test_a_second_writer_waits_for_the_first_ones_commit(sqlite_url: str) -> None:
    first_engine, second_engine = create_engine(sqlite_url), create_engine(sqlite_url)
    began, done = threading.Event(), threading.Event()
    try:
        with first_engine.begin() as connection:
            connection.exec_driver_sql("SELECT 1")
            thread = threading.Thread(target=_begin_in_thread, args=(second_engine, began, done))
            thread.start()
            assert not began.wait(0.3)
            # It waits in the kernel, on the turn file: one granted flock, one blocked on it.
            turn = Path(f"{first_engine.url.database}-write-turn")
            assert _flocks_on(turn) == {"granted": 1, "waiting": 1}
        assert began.wait(5)  # and writing as soon as the first one committed
        assert done.wait(5)
        thread.join()
    finally:
        first_engine.dispose()
        second_engine.dispose()


def _roll_back(connection: sa.Connection) -> None:
    connection.rollback()


def _drop(connection: sa.Connection) -> None:
    connection.invalidate()  # the driver connection is closed, its transaction abandoned


@pytest.mark.parametrize("end", [_roll_back, _drop], ids=["rollback", "closed connection"])
def test_a_transaction_that_ends_without_commit_gives_the_turn_back(
    sqlite_url: str, end: Callable[[sa.Connection], None]
) -> None:
    first_engine, second_engine = create_engine(sqlite_url), create_engine(sqlite_url)
    began, done = threading.Event(), threading.Event()
    try:
        connection = first_engine.connect()
        connection.begin()
        thread = threading.Thread(target=_begin_in_thread, args=(second_engine, began, done))
        thread.start()
        assert not began.wait(0.3)
        end(connection)
        assert done.wait(5)
        thread.join()
        connection.close()
    finally:
        first_engine.dispose()
        second_engine.dispose()
