"""A short seeded simulation against a real `billhook run`, SIGKILLing worker processes.

The full report must hold: every 2xx stored, every event acknowledged, final states, effects.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from billhook.sim.delivery import DeliveryOptions
from billhook.sim.runner import SimulationConfig, run_simulation
from billhook.sim.selfhost import SelfHosted
from billhook.sim.sink import SmtpSink


@pytest.mark.slow
def test_a_seeded_run_with_worker_crashes_keeps_the_invariants(
    database_url: str, tmp_path: Path
) -> None:
    config = SimulationConfig(
        invoices=15,
        seed=7,
        delivery=DeliveryOptions(duplicates=0.2, reorder=True, concurrency=4),
        crash_workers=True,
        converge_timeout=40,
        namespace="ci",
    )
    with SmtpSink() as sink:
        hosted = SelfHosted(tmp_path / "sim", sink, database_url=database_url, seed=7)
        try:
            hosted.start()
            backend = hosted.backend(crash_workers=True, store_outage=False, outage_seconds=0)
            report = asyncio.run(run_simulation(config, backend, sink))
        finally:
            hosted.stop()
        assert not hosted.worker_pids()
    assert report.crashes >= 1
    assert report.never_acknowledged == 0
    assert report.acked_not_stored == 0
    assert report.events_stored == report.events
    assert report.ok, report.violations
