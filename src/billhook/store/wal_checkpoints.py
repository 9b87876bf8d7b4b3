"""`WalCheckpointer`: copies committed SQLite WAL pages into the database file beside a writer.

SQLite checkpoints from inside the COMMIT that finds the WAL past its threshold (1,000 pages by
default), and the whole batch of that commit waits while ~4 MB are copied and synced. At ingest
rates the WAL grows by that much every few dozen milliseconds. So the ingest writer raises its
own threshold (`WRITER_AUTOCHECKPOINT_PAGES`) and this thread runs a PASSIVE checkpoint instead,
at most every `interval` seconds while commits arrive. A PASSIVE checkpoint never blocks a writer
and is skipped while one runs.

Spacing the checkpoints matters as much as moving them: a checkpoint copies each changed page
once, however many commits rewrote it in the meantime. The right-most pages of every append
index and table are rewritten by nearly every group commit, and a checkpoint after every commit
copied them every time (measured: about a fifth of the writer's CPU per event).

Durability is unchanged: the WAL is synced at every commit, and the database file is synced
before SQLite reuses the WAL.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

# The ingest writer's `wal_autocheckpoint`: high enough that its commits almost never checkpoint
# themselves while this thread keeps up, low enough (~40 MB of WAL) to bound the file if it
# cannot (a reader holding an old snapshot, this thread stopped).
WRITER_AUTOCHECKPOINT_PAGES = 10_000
DEFAULT_INTERVAL_S = 0.025


class WalCheckpointer:
    """A thread that checkpoints `database` after commits, at most every `interval` seconds."""

    def __init__(self, database: str, *, interval: float = DEFAULT_INTERVAL_S) -> None:
        self._database = database
        self._interval = interval
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="billhook-checkpointer", daemon=True
            )
            self._thread.start()

    def committed(self) -> None:
        """A commit added pages to the WAL: checkpoint them soon."""
        self._wake.set()

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        connection: sqlite3.Connection | None = None
        try:
            while True:
                self._wake.wait()
                if self._stopping:
                    return
                # Let the commits of the next few milliseconds join this checkpoint.
                time.sleep(self._interval)
                self._wake.clear()
                if self._stopping:  # close() may have set it, and the wake-up, while we slept
                    return
                connection = self._checkpoint(connection)
        finally:
            if connection is not None:
                connection.close()

    def _checkpoint(self, connection: sqlite3.Connection | None) -> sqlite3.Connection | None:
        try:
            if connection is None:
                # mode=rw: never create a database file that is not there.
                connection = sqlite3.connect(
                    Path(self._database).resolve().as_uri() + "?mode=rw",
                    uri=True,
                    isolation_level=None,
                    timeout=0,
                )
                connection.execute("PRAGMA synchronous=FULL")
            connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            return connection
        except sqlite3.Error:
            # The commits' own checkpoints still run; try afresh after the next commit.
            if connection is not None:
                connection.close()
            return None
