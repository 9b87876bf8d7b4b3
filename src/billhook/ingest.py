"""`EventWriter`: one thread that commits the deliveries arriving together in one transaction.

One commit per delivery caps ingest at the database's commit rate; grouping the deliveries that
are waiting when the previous commit finishes lifts that cap, and each caller is still answered
only after the commit that holds its delivery. No delivery waits for others to arrive: a lone
delivery is committed alone, at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from sqlalchemy.engine import Connection, Engine

from billhook.errors import BillhookError, StoreUnavailable
from billhook.observability import get_logger
from billhook.sources import IncomingEvent
from billhook.store.engine import DRIVER_ERRORS, unavailable
from billhook.store.events import Arrival, Recorded, record_batch

MAX_BATCH = 256

log = get_logger(__name__)


@dataclass(slots=True)
class _Pending:
    arrival: Arrival
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Recorded]


class EventWriter:
    """Submit verified events from the event loop; a background thread stores them."""

    def __init__(
        self, engine: Engine, *, max_attempts: int, clock: Callable[[], float] = time.time
    ) -> None:
        self._engine = engine
        self._max_attempts = max_attempts
        self._clock = clock
        self._queue: queue.SimpleQueue[list[_Pending] | None] = queue.SimpleQueue()
        # Per event loop: the deliveries of its current iteration, handed over together.
        self._gathering: dict[asyncio.AbstractEventLoop, list[_Pending]] = {}
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._connection: Connection | None = None

    async def store(self, event: IncomingEvent, received_at: float) -> Recorded:
        """Return once the delivery is committed; raise `StoreUnavailable` if it cannot be."""
        self._ensure_started()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Recorded] = loop.create_future()
        gathering = self._gathering.get(loop)
        if gathering is None:
            gathering = self._gathering[loop] = []
            loop.call_soon(self._hand_over, loop)
        gathering.append(_Pending(Arrival(event, received_at), loop, future))
        return await future

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        """At the next turn of the loop: every delivery verified in this one, as one item.

        Waking the writer thread once per delivery made it take the GIL from the loop once per
        delivery, and commit whatever had come in by then: when commits were quick (duplicates)
        batches shrank and each delivery paid for more commits and more GIL hand-offs. This
        delays no delivery past the current turn of the loop.
        """
        self._queue.put(self._gathering.pop(loop))

    def close(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _ensure_started(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="billhook-event-writer", daemon=True
                    )
                    self._thread.start()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            stopping = self._commit(first, gather=True)

    def _gather(self, batch: list[_Pending]) -> bool:
        """Add what was handed over since `batch` was taken; True once `close()` asked to stop."""
        while len(batch) < MAX_BATCH:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return False
            if item is None:
                return True
            batch.extend(item)
        return False

    def _commit(self, batch: list[_Pending], *, gather: bool = False) -> bool:
        """Store `batch` in one transaction and answer it; with `gather`, the transaction also
        takes every delivery handed over until it began. Returns whether to stop afterwards.

        Gathering once the transaction has begun, not before, matters when others write to the
        same database (workers, on SQLite): deliveries that arrive while this writer waits for
        its turn join this commit instead of waiting for a turn of their own.
        """
        stopping = False
        try:
            with self._transaction() as connection:
                if gather:
                    stopping = self._gather(batch)
                results = record_batch(
                    connection,
                    [p.arrival for p in batch],
                    now=self._clock(),
                    max_attempts=self._max_attempts,
                )
        except StoreUnavailable as exc:
            _settle([(pending, None, exc) for pending in batch])
            return stopping
        except Exception as exc:
            if len(batch) > 1:
                # One bad delivery must not fail the others: store them one by one.
                for pending in batch:
                    self._commit([pending])
                return stopping
            event_id = batch[0].arrival.event.event_id
            log.error("ingest write failed", error=repr(exc), event_id=event_id)
            _settle([(batch[0], None, _as_unavailable(exc))])
            return stopping
        _settle([(p, r, None) for p, r in zip(batch, results, strict=True)])
        return stopping

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """One transaction on the writer's own connection, held across batches.

        Checking a connection out of the pool and back in (with its reset) for every group
        commit cost more than the commit's statements. A connection that failed is dropped,
        and the next batch opens a fresh one.
        """
        try:
            if self._connection is None:
                self._connection = self._engine.connect()
            connection = self._connection
            with connection.begin():
                yield connection
        except DRIVER_ERRORS as exc:
            self._drop_connection()
            raise unavailable(exc) from exc
        except BaseException:
            if self._connection is not None and self._connection.invalidated:
                self._drop_connection()
            raise

    def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.invalidate()
                connection.close()


def _as_unavailable(exc: Exception) -> BillhookError:
    return StoreUnavailable(f"the database refused the write ({type(exc).__name__})")


_Outcome = tuple[_Pending, Recorded | None, BaseException | None]


def _settle(outcomes: list[_Outcome]) -> None:
    """Answer a whole batch with one wake-up per event loop, not one per delivery."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
    for outcome in outcomes:
        by_loop.setdefault(outcome[0].loop, []).append(outcome)
    for loop, group in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            loop.call_soon_threadsafe(_resolve, group)


def _resolve(group: list[_Outcome]) -> None:
    for pending, result, error in group:
        if pending.future.done():  # the client went away; the outcome stands regardless
            continue
        if error is not None:
            pending.future.set_exception(error)
        else:
            assert result is not None
            pending.future.set_result(result)
