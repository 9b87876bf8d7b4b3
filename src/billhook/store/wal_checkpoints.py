"""`WalCheckpointer`: copies committed SQLite WAL pages into the database file, off the commits.

SQLite checkpoints from inside the COMMIT that finds the WAL past its threshold (1,000 pages by
default): that commit's transaction, and on SQLite every writer queued behind its write turn,
waits while ~4 MB are copied and synced. At ingest rates the WAL grows by that much every few
dozen milliseconds. So billhook's SQLite connections raise the threshold
(`WRITER_AUTOCHECKPOINT_PAGES`) and each process runs one `WalCheckpointer` thread per database
file (`checkpointer_for`), which runs a PASSIVE checkpoint at most every `interval` seconds while
commits arrive. A PASSIVE checkpoint never blocks a writer and is skipped while another runs.

Spacing the checkpoints matters as much as moving them: a checkpoint copies each changed page
once, however many commits rewrote it in the meantime. The right-most pages of every append
index and table are rewritten by nearly every group commit, and a checkpoint after every commit
copied them every time (measured: about a fifth of the writer's CPU per event).

The processes writing one file share one rate: in WAL mode only checkpoints write the database
file, so a checkpointer waits until `interval` has passed since its last modification, whoever
made it. Measured in the pipeline benchmark (serve + 2 workers, each with a checkpointer): 1,934,
1,926, 1,694 events/s against 1,764, 1,586, 1,457 without, runs interleaved.

The thread starts with the first commit and ends after `idle_exit` seconds without one, so a
process that stops writing to a database keeps no thread or connection open on it.

Durability is unchanged: the WAL is synced at every commit, and the database file is synced
before SQLite reuses the WAL.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

# billhook's `wal_autocheckpoint`: high enough that commits almost never checkpoint themselves
# while the checkpointer keeps up, low enough (~40 MB of WAL) to bound the file if it cannot
# (a reader holding an old snapshot).
WRITER_AUTOCHECKPOINT_PAGES = 10_000
DEFAULT_INTERVAL_S = 0.025
IDLE_EXIT_S = 2.0


class WalCheckpointer:
    """A thread that checkpoints `database` after commits, at most every `interval` seconds."""

    def __init__(
        self, database: str, *, interval: float = DEFAULT_INTERVAL_S, idle_exit: float = IDLE_EXIT_S
    ) -> None:
        self._database = database
        self._interval = interval
        self._idle_exit = idle_exit
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.checkpoints = 0  # run by this checkpointer

    @property
    def running(self) -> bool:
        return self._thread is not None

    def committed(self) -> None:
        """A commit added pages to the WAL: checkpoint them soon (starting the thread if idle)."""
        self._wake.set()
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(
                    target=self._run, name="billhook-checkpointer", daemon=True
                )
                self._thread.start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            thread = self._thread
        self._wake.set()
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        connection: sqlite3.Connection | None = None
        try:
            while True:
                if not self._wake.wait(self._idle_exit):
                    with self._lock:  # committed() starts a new thread once this one is gone
                        if not self._wake.is_set():
                            self._thread = None
                            return
                    continue
                if self._closed:
                    return
                # Let the commits of the next few milliseconds join this checkpoint, and leave
                # at least `interval` after the last one, whichever process ran it.
                time.sleep(self._interval)
                time.sleep(self._until_due())
                self._wake.clear()
                if self._closed:  # close() may have set it, and the wake-up, while we slept
                    return
                connection = self._checkpoint(connection)
        finally:
            if connection is not None:
                connection.close()

    def _until_due(self) -> float:
        """Seconds until `interval` has passed since the database file was last written.

        In WAL mode only checkpoints write the database file, so its modification time is when
        the last checkpoint of any process copied pages: the processes that share a file share
        one checkpoint rate instead of each adding its own."""
        try:
            since = time.time() - os.stat(self._database).st_mtime
        except OSError:
            return 0.0
        return min(max(self._interval - since, 0.0), self._interval)

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
            busy, _log, _copied = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            self.checkpoints += not busy
            return connection
        except sqlite3.Error:
            # The commits' own checkpoints still run; try afresh after the next commit.
            if connection is not None:
                connection.close()
            return None


_shared: dict[str, WalCheckpointer] = {}
_shared_lock = threading.Lock()


def checkpointer_for(database: str) -> WalCheckpointer:
    """This process's checkpointer for the SQLite file `database` (one per file, shared)."""
    key = os.path.realpath(database)
    with _shared_lock:
        found = _shared.get(key)
        if found is None:
            found = _shared[key] = WalCheckpointer(key)
        return found


def _forget_after_fork() -> None:
    """A forked child has none of its parent's threads: it starts checkpointers of its own."""
    global _shared_lock
    _shared.clear()
    _shared_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
