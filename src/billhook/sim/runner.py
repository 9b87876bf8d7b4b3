"""Orchestration: generate histories, start the sink (and billhook, when self-hosted), deliver
with faults, wait for convergence, observe, check."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from billhook.errors import ConfigError
from billhook.sim.checker import DeadLetter, Observation, Report, check, converged
from billhook.sim.delivery import DeliveryLog, DeliveryOptions, deliver, plan_deliveries
from billhook.sim.histories import History, generate_histories
from billhook.sim.sink import SmtpSink

Echo = Callable[[str], None]


@dataclass(frozen=True)
class SimulationConfig:
    target: str | None = None
    invoices: int = 50
    seed: int = 0
    delivery: DeliveryOptions = field(default_factory=DeliveryOptions)
    crash_workers: bool = False
    smtp_outage: bool = False
    store_outage: bool = False
    smtp_port: int = 0
    token: str | None = None
    secret: str | None = None
    database_url: str | None = None
    converge_timeout: float = 60.0
    settle_seconds: float = 1.0
    outage_seconds: float = 3.0
    # Longer than the provider's request timeout (5 s), so the outage yields real timeouts and
    # 503s, and the provider's retries, not only slow 2xx.
    store_outage_seconds: float = 8.0
    fault_tail_seconds: float = 2.0
    namespace: str = ""


@dataclass
class Backend:
    """What the runner needs from a receiver: where to send, how to read it back.

    A self-hosted billhook adds store reads (events stored, dead letters, pending effects)
    and its fault injectors; a foreign `--target` has only the HTTP contract.
    """

    base_url: str
    secret: str
    token: str | None = None
    stored_event_ids: Callable[[], frozenset[str]] | None = None
    dead_letters: Callable[[], Sequence[DeadLetter]] = lambda: ()
    quiescent: Callable[[], bool] = lambda: True
    faults: list[Callable[[asyncio.Event], Coroutine[Any, Any, None]]] = field(default_factory=list)
    crashes: Callable[[], int] = lambda: 0
    notes: list[str] = field(default_factory=list)


async def run_simulation(
    config: SimulationConfig, backend: Backend, sink: SmtpSink, echo: Echo = lambda _: None
) -> Report:
    histories = generate_histories(
        config.seed, config.invoices, start=int(time.time()) - 7200, namespace=config.namespace
    )
    rng = random.Random(config.seed)
    plan = plan_deliveries(histories, rng, config.delivery)
    echo(
        f"{len(histories)} invoices, {sum(len(h.events) for h in histories)} events, "
        f"{len(plan)} planned deliveries to {backend.base_url} (seed {config.seed})"
    )
    # Faults strike while the provider delivers (and a moment after); then the receiver must
    # converge on its own. Killing workers forever would only prove nothing can progress.
    done = asyncio.Event()
    fault_tasks: list[asyncio.Task[None]] = [
        asyncio.create_task(fault(done)) for fault in backend.faults
    ]
    if config.smtp_outage:
        fault_tasks.append(
            asyncio.create_task(_smtp_outage(sink, config.outage_seconds, rng.random(), done))
        )
    log = DeliveryLog()
    started = time.monotonic()
    try:
        await deliver(
            backend.base_url.rstrip("/") + "/webhooks/stripe",
            backend.secret,
            plan,
            config.delivery,
            rng,
            log,
        )
        delivered_at = time.monotonic()
        echo(f"delivered in {delivered_at - started:.2f}s; waiting for convergence")
        asyncio.get_running_loop().call_later(config.fault_tail_seconds, done.set)
        observation = await _await_convergence(config, backend, sink, histories, log)
    finally:
        done.set()
        await asyncio.gather(*fault_tasks, return_exceptions=True)
        sink.refusing = False
    notes = list(backend.notes)
    if sink.refused:
        notes.append(f"the SMTP sink refused {sink.refused} message(s) during its outage")
    observation = dataclasses.replace(observation, crashes=backend.crashes(), notes=notes)
    return check(histories, observation)


async def _await_convergence(
    config: SimulationConfig,
    backend: Backend,
    sink: SmtpSink,
    histories: Sequence[History],
    log: DeliveryLog,
) -> Observation:
    started = time.monotonic()
    deadline = started + config.converge_timeout
    converged_at: float | None = None
    headers = {"Authorization": f"Bearer {backend.token}"} if backend.token else {}
    async with httpx.AsyncClient(base_url=backend.base_url, headers=headers, timeout=10) as client:
        while True:
            observation = await _observe(client, backend, sink, histories, log)
            now = time.monotonic()
            if converged_at is None and converged(histories, observation) and backend.quiescent():
                converged_at = now
            # After convergence, keep listening a moment: late duplicates must be caught too.
            if converged_at is not None and now - converged_at >= config.settle_seconds:
                break
            if now > deadline:
                break
            await asyncio.sleep(0.25)
    total = None if converged_at is None else converged_at - started
    return dataclasses.replace(observation, converge_seconds=total)


async def _observe(
    client: httpx.AsyncClient,
    backend: Backend,
    sink: SmtpSink,
    histories: Sequence[History],
    log: DeliveryLog,
) -> Observation:
    limit = asyncio.Semaphore(16)

    async def fetch(invoice_id: str) -> tuple[str, dict[str, Any] | None]:
        async with limit:
            try:
                response = await client.get(f"/api/v1/invoices/{invoice_id}")
            except httpx.HTTPError:
                return invoice_id, None
        if response.status_code == 401 or response.status_code == 403:
            raise ConfigError(
                f"GET /api/v1/invoices answered {response.status_code}: pass a viewer token "
                "with --token or BILLHOOK_TOKEN"
            )
        if response.status_code != 200:
            return invoice_id, None
        value = response.json()
        return invoice_id, value if isinstance(value, dict) else None

    results = await asyncio.gather(*(fetch(h.invoice_id) for h in histories))
    stored = await asyncio.to_thread(backend.stored_event_ids) if backend.stored_event_ids else None
    return Observation(
        deliveries=log.stats(),
        invoices=dict(results),
        emails=sink.observed(),
        stored_event_ids=stored,
        dead_letters=await asyncio.to_thread(backend.dead_letters),
    )


async def _smtp_outage(sink: SmtpSink, seconds: float, phase: float, done: asyncio.Event) -> None:
    """Refuse mail for `seconds`, starting a little into the run."""
    try:
        await asyncio.wait_for(done.wait(), timeout=0.3 + phase)
        return
    except TimeoutError:
        pass
    sink.refusing = True
    try:
        await asyncio.sleep(seconds)
    finally:
        sink.refusing = False
