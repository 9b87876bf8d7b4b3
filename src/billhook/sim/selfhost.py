"""The simulator's own billhook: `billhook run` on a temporary SQLite file (or a PostgreSQL
database), mail to the sink, a generated secret and token, and real fault injectors:
SIGKILL of worker processes, and a store that really stops accepting writes for a while."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from billhook.errors import ConfigError
from billhook.ops.tokens import create_token
from billhook.sim.checker import DeadLetter
from billhook.sim.runner import Backend, Echo
from billhook.sim.sink import SmtpSink
from billhook.store.engine import create_engine, normalize_url
from billhook.store.migrate import upgrade

T = TypeVar("T")
_BUSY_JOBS = ("available", "running", "retryable")
_BUSY_EFFECTS = ("pending", "sending", "retryable")


def _billhook(*args: str) -> list[str]:
    return [sys.executable, "-m", "billhook", *args]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SelfHosted:
    """Start with `start()` (blocking until ready), always `stop()`; `backend()` for the runner."""

    def __init__(
        self,
        workdir: Path,
        sink: SmtpSink,
        *,
        database_url: str | None = None,
        workers: int = 2,
        seed: int = 0,
        echo: Echo = lambda _: None,
    ) -> None:
        self.workdir = workdir
        self.database_url = database_url or f"sqlite:///{workdir / 'billhook.db'}"
        self.secret = "whsec_" + secrets.token_hex(24)
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.token: str | None = None
        self.killed = 0
        self._rng = random.Random(seed)
        self._echo = echo
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path = workdir / "billhook-run.log"
        self._reader: Engine | None = None
        self._last: dict[str, Any] = {}
        self.env = {
            **os.environ,
            "BILLHOOK_DATABASE_URL": self.database_url,
            "BILLHOOK_STRIPE_WEBHOOK_SECRETS": self.secret,
            "BILLHOOK_SMTP_URL": sink.url,
            "BILLHOOK_HOST": "127.0.0.1",
            "BILLHOOK_PORT": str(self.port),
            "BILLHOOK_DATA_DIR": str(workdir / "data"),
            "BILLHOOK_WORKERS": str(workers),
            # Compressed time, so a killed worker's job comes back within the run.
            "BILLHOOK_LEASE_SECONDS": "3",
            "BILLHOOK_RETRY_BASE_SECONDS": "0.2",
            "BILLHOOK_RETRY_MAX_SECONDS": "2",
            "BILLHOOK_SHUTDOWN_GRACE_SECONDS": "5",
            "BILLHOOK_LOG_FORMAT": "json",
            "BILLHOOK_LOG_LEVEL": "warning",
        }

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, ready_timeout: float = 60.0) -> SelfHosted:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # In-process, not `billhook migrate` / `billhook token create`: same code, two fewer
        # interpreter start-ups.
        engine = create_engine(self.database_url, poolclass=sa.NullPool)
        try:
            upgrade(engine)
            self.token = create_token(
                engine, name=f"simulate-{secrets.token_hex(3)}", role="viewer", actor="simulate"
            )
        finally:
            engine.dispose()
        log = self._log_path.open("ab")
        self._process = subprocess.Popen(
            _billhook("run"),
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + ready_timeout
        while True:
            if self._process.poll() is not None:
                raise ConfigError(f"`billhook run` exited early; see {self._log_path}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ConfigError(f"`billhook run` not ready after {ready_timeout}s")
            time.sleep(0.1)
        self._reader = sa.create_engine(normalize_url(self.database_url), poolclass=sa.NullPool)
        self._echo(f"billhook run (pid {self._process.pid}) at {self.base_url}")
        return self

    def stop(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if process is not None:
            with contextlib.suppress(ProcessLookupError):  # children the supervisor left
                os.killpg(process.pid, signal.SIGKILL)
        if self._reader is not None:
            self._reader.dispose()

    def backend(self, *, crash_workers: bool, store_outage: bool, outage_seconds: float) -> Backend:
        faults: list[Callable[[asyncio.Event], Coroutine[Any, Any, None]]] = []
        if crash_workers:
            faults.append(self._crash_workers)
        if store_outage:
            seconds = outage_seconds

            async def outage(done: asyncio.Event) -> None:
                await self._store_outage(done, seconds)

            faults.append(outage)
        assert self.token is not None, "start() first"
        return Backend(
            base_url=self.base_url,
            secret=self.secret,
            token=self.token,
            stored_event_ids=self.stored_event_ids,
            dead_letters=self.dead_letters,
            quiescent=self.quiescent,
            faults=faults,
            crashes=lambda: self.killed,
            notes=[f"billhook run log: {self._log_path}"],
        )

    # -- reads (straight from the store: the simulator owns this database) ---------------------

    def stored_event_ids(self) -> frozenset[str]:
        def read(connection: sa.Connection) -> frozenset[str]:
            rows = connection.exec_driver_sql("SELECT event_id FROM events WHERE source = 'stripe'")
            return frozenset(row[0] for row in rows)

        return self._read("stored", read, frozenset())

    def dead_letters(self) -> Sequence[DeadLetter]:
        def read(connection: sa.Connection) -> list[DeadLetter]:
            jobs = connection.exec_driver_sql(
                "SELECT e.event_id, j.last_error FROM jobs j LEFT JOIN events e"
                " ON e.id = j.event_pk WHERE j.state = 'dead'"
            )
            found = [DeadLetter("job", str(r[0]), str(r[1] or "")) for r in jobs]
            effects = connection.exec_driver_sql(
                "SELECT idempotency_key, last_error FROM effects WHERE state = 'dead'"
            )
            found += [DeadLetter("effect", str(r[0]), str(r[1] or "")) for r in effects]
            return found

        return self._read("dead", read, [])

    def quiescent(self) -> bool:
        def read(connection: sa.Connection) -> bool:
            busy = connection.exec_driver_sql(
                "SELECT (SELECT COUNT(*) FROM jobs WHERE state IN ('available', 'running',"
                " 'retryable')) + (SELECT COUNT(*) FROM effects WHERE state IN ('pending',"
                " 'sending', 'retryable'))"
            ).scalar()
            return not busy

        return self._read("quiescent", read, False)

    def _read(self, name: str, read: Callable[[sa.Connection], T], default: T) -> T:
        # During a store outage reads fail too: keep the last good answer.
        assert self._reader is not None, "start() first"
        try:
            with self._reader.connect() as connection:
                value = read(connection)
        except sa.exc.DBAPIError:
            return self._last.get(name, default)  # type: ignore[no-any-return]
        self._last[name] = value
        return value

    # -- faults -------------------------------------------------------------------------------

    def worker_pids(self) -> list[int]:
        """Children of `billhook run` whose command line is `... billhook worker`."""
        if self._process is None:
            return []
        found = []
        for child in _children(self._process.pid):
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"worker" in argv:
                found.append(child)
        return found

    async def _crash_workers(self, done: asyncio.Event) -> None:
        while not done.is_set():
            try:
                await asyncio.wait_for(done.wait(), timeout=self._rng.uniform(0.3, 1.5))
                return
            except TimeoutError:
                pass
            pids = self.worker_pids()
            if not pids:
                continue
            victim = self._rng.choice(pids)
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.killed += 1
            self._echo(f"SIGKILL worker pid {victim}")

    async def _store_outage(self, done: asyncio.Event, seconds: float) -> None:
        try:
            await asyncio.wait_for(done.wait(), timeout=0.5 + self._rng.random())
            return
        except TimeoutError:
            pass
        self._echo(f"store outage for {seconds:.1f}s")
        if self.database_url.startswith("sqlite"):
            await asyncio.to_thread(_hold_sqlite_write_lock, self.database_url, seconds)
        else:
            await asyncio.to_thread(_refuse_postgres_connections, self.database_url, seconds)
        self._echo("store back")


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _hold_sqlite_write_lock(url: str, seconds: float) -> None:
    """An exclusive write lock held by another process-level connection: commits queue behind
    it (up to billhook's busy timeout) and then fail; the API answers slowly or 503."""
    path = url.split("///", 1)[1]
    connection = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        connection.execute("BEGIN EXCLUSIVE")
        time.sleep(seconds)
        connection.execute("ROLLBACK")
    finally:
        connection.close()


def _refuse_postgres_connections(url: str, seconds: float) -> None:
    """Close every session on the database and refuse new ones for `seconds`."""
    target = make_url(normalize_url(url))
    name = target.database
    admin = sa.create_engine(
        target.set(database="postgres"), isolation_level="AUTOCOMMIT", poolclass=sa.NullPool
    )
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            connection.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
        stop = threading.Event()
        stop.wait(seconds)
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        admin.dispose()
