"""SQLite write turns: every write transaction on one database file queues in the kernel.

SQLite lets one transaction write at a time. A connection that finds the write lock taken sleeps
in SQLite's busy handler, in naps that grow to 100 ms however soon the lock is free again: with
an ingest writer and two workers on one file, most of a second could pass with the lock free and
everyone asleep. Before `BEGIN IMMEDIATE`, each connection takes an exclusive `flock` on a file
beside the database (`<database>-write-turn`) and gives it back after its COMMIT or ROLLBACK,
so the writers of every process and thread wait in the kernel, which wakes the next one the
moment the turn is free. flock locks belong to the open file, so every connection opens its own.

A connection's `after_write` (set by the engine: its database's WAL checkpointer) is called
after each commit that changed rows, once the turn is given back.

SQLite's own lock still guards the data; the turn only orders the waiting. A process killed
mid-transaction gives its turn back with its files. A thread that already holds a turn through
one connection and begins on another does not wait for itself: it goes straight to SQLite's
busy timeout, as without turns. A process that hangs inside a transaction stalls the others'
writes until it ends, as SQLite's lock alone would until the busy timeout.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
from collections.abc import Callable
from typing import Any

# Threads holding a turn (by ident), whichever connection took it and whichever thread ends it.
_holders: set[int] = set()


def is_database_file(database: str | None) -> bool:
    """A plain file path (not `:memory:`, not a `file:` URI): turns and checkpoints apply."""
    return bool(database) and database != ":memory:" and not str(database).startswith("file:")


class TurnTakingConnection(sqlite3.Connection):
    """A `sqlite3.Connection` (`factory=` of `sqlite3.connect`) that takes turns at writing."""

    def __init__(self, database: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(database, *args, **kwargs)
        self._turn_fd: int | None = None
        self._holder: int | None = None
        self._changes_at_begin = 0
        self.after_write: Callable[[], None] | None = None
        if is_database_file(database):
            with contextlib.suppress(OSError):  # no such directory: SQLite will say so itself
                self._turn_fd = os.open(database + "-write-turn", os.O_RDWR | os.O_CREAT, 0o600)

    def begin_immediate(self) -> None:
        """Wait for this database's write turn, then `BEGIN IMMEDIATE`."""
        self._take_turn()
        self._changes_at_begin = self.total_changes
        try:
            self.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._give_turn_back()
            raise

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self._give_turn_back()
        if self.after_write is not None and self.total_changes != self._changes_at_begin:
            self.after_write()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self._give_turn_back()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._give_turn_back()
            if self._turn_fd is not None:
                os.close(self._turn_fd)
                self._turn_fd = None

    def _take_turn(self) -> None:
        thread = threading.get_ident()
        if self._turn_fd is None or self._holder is not None or thread in _holders:
            return
        fcntl.flock(self._turn_fd, fcntl.LOCK_EX)  # releases the GIL while it waits
        self._holder = thread
        _holders.add(thread)

    def _give_turn_back(self) -> None:
        if self._holder is None or self._turn_fd is None:
            return
        _holders.discard(self._holder)
        self._holder = None
        fcntl.flock(self._turn_fd, fcntl.LOCK_UN)
