"""`billhook run`: migrate, then the API and BILLHOOK_WORKERS workers as one process tree."""

from __future__ import annotations

from billhook.cli.app import app, console, open_engine, settings
from billhook.observability import configure_logging
from billhook.queue.runner import ChildSpec, billhook_command, run_tree
from billhook.store.migrate import upgrade


@app.command()
def run() -> None:
    """Everything in one command: database migrated, API served, jobs and effects processed."""
    config = settings()
    configure_logging(config)
    engine = open_engine(config)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    children = [ChildSpec("api", billhook_command("serve"))]
    children += [
        ChildSpec(f"worker-{n}", billhook_command("worker")) for n in range(config.workers)
    ]
    console.print(
        f"billhook on http://{config.host}:{config.port} with {config.workers} worker process(es)"
    )
    raise SystemExit(run_tree(children, grace_seconds=config.shutdown_grace_seconds))
