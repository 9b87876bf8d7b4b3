"""`billhook worker`: job workers (and the effect dispatcher) alone, for scaling out."""

from __future__ import annotations

import ctypes
import os
import sys

import typer
from sqlalchemy.engine import Engine

from billhook.cli.app import app, open_engine, settings
from billhook.config import Settings
from billhook.observability import configure_logging, get_logger
from billhook.queue.registry import default_registry, load_registry
from billhook.queue.worker import Service, Worker, WorkerConfig

_log = get_logger(__name__)


@app.command()
def worker(
    concurrency: int = typer.Option(
        None,
        "--concurrency",
        "-c",
        min=1,
        help="Jobs run at once (default BILLHOOK_WORKER_CONCURRENCY).",
    ),
    effects: bool = typer.Option(
        True, "--effects/--no-effects", help="Also run the effect dispatcher in this process."
    ),
    handlers: str = typer.Option(
        None, "--handlers", hidden=True, help="module:attr of a Registry (tests, benchmarks)."
    ),
) -> None:
    """Claim and run jobs until SIGTERM/SIGINT, then finish or release them and exit 0."""
    cap_malloc_arenas()
    config = settings()
    configure_logging(config)
    engine = open_engine(config)
    registry = load_registry(handlers) if handlers else default_registry()
    services = effect_services(engine, config) if effects else []
    runner = Worker(
        engine, WorkerConfig.from_settings(config, concurrency), registry, services=services
    )
    try:
        runner.serve_until_signalled()
    finally:
        for service in services:
            close = getattr(service, "close", None)
            if close is not None:
                close()
        engine.dispose()


def cap_malloc_arenas(arenas: int = 2) -> None:
    """Keep glibc to a few malloc arenas in this long-lived, many-threaded process.

    glibc gives threads their own arenas (up to 8 per core) and rarely returns their free
    memory: a worker's resident memory kept creeping for hundreds of thousands of events while
    Python's own allocations stayed flat (bench/memory.py). Must run before threads start.
    Same effect as MALLOC_ARENA_MAX; a no-op on other C libraries."""
    if sys.platform != "linux" or "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        return


_M_ARENA_MAX = -8  # from glibc's malloc.h


def effect_services(engine: Engine, config: Settings) -> list[Service]:
    """The effect dispatcher and the held-refund sweeper."""
    try:
        from billhook.effects.dispatcher import EffectDispatcher
    except ImportError:
        return []
    from billhook.attention import AttentionSweeper

    return [EffectDispatcher(engine, config), AttentionSweeper(engine, config)]
