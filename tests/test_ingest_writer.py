"""The ingest writers of several server processes on one SQLite file take turns at writing.

Each `EventWriter` holds an exclusive `flock` on a file beside the database around its
transaction, so a second process's writer waits in the kernel (and is woken at once) instead of
sleeping in SQLite's busy handler. Two writers with their own engines behave like two processes:
flock locks belong to the open file, not to the process.
"""

from __future__ import annotations

import threading
from pathlib import Path

from billhook.ingest import EventWriter
from billhook.store.engine import create_engine


def test_a_second_sqlite_writer_waits_for_the_first_ones_turn(sqlite_url: str) -> None:
    first_engine, second_engine = create_engine(sqlite_url), create_engine(sqlite_url)
    first = EventWriter(first_engine, max_attempts=3)
    second = EventWriter(second_engine, max_attempts=3)
    second_writing = threading.Event()

    def take_turn() -> None:
        with second._write_turn():
            second_writing.set()

    try:
        with first._write_turn():
            thread = threading.Thread(target=take_turn)
            thread.start()
            assert not second_writing.wait(0.3)  # blocked while the first one writes
        assert second_writing.wait(5)  # and writing as soon as it is done
        thread.join()
        assert Path(f"{first_engine.url.database}-ingest-lock").exists()
    finally:
        first.close()
        second.close()
        first_engine.dispose()
        second_engine.dispose()
