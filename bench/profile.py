"""Profile of the hottest path: the worker's process-event jobs, then the dispatcher's sends.

    .venv/bin/python -m bench.profile [--events 2000] [--database sqlite|postgresql]

In this process, on one thread: seed `--events` stored events with their jobs, drain them with
`Worker.run_once()` (claim, `Processor`, complete), then drain the outbox with
`EffectDispatcher.run_once()` into a local SMTP sink (Postfix's smtp-sink when installed, else
aiosmtpd in this process). Each phase is timed, and profiled with
pyinstrument; the report keeps the top frames of each.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import PostfixSink, SmtpSink, database, say
from bench._events import seed
from billhook.config import Settings
from billhook.effects.dispatcher import EffectDispatcher
from billhook.processing import Processor
from billhook.queue.registry import Registry
from billhook.queue.worker import Worker, WorkerConfig
from billhook.store.engine import create_engine

TOP = 25


def run_profile(events: int, kind: str = "sqlite", profile: bool = True) -> dict[str, Any]:
    from pyinstrument import Profiler

    # Postfix's smtp-sink when installed: aiosmtpd would run in this process, its CPU and GIL
    # hand-offs inside the dispatcher phase being measured.
    sink_type = PostfixSink if PostfixSink.available() else SmtpSink
    with tempfile.TemporaryDirectory(prefix="billhook-profile-") as tmp, sink_type() as sink:
        with database(kind, Path(tmp)) as url:
            engine = create_engine(url)
            try:
                seed(engine, events)
                settings = Settings(database_url=url, smtp_url=sink.url, data_dir=tmp)
                worker = Worker(
                    engine,
                    WorkerConfig(concurrency=50),
                    Registry({"process_event": Processor(settings)}),
                )
                dispatcher = EffectDispatcher(engine, settings, batch_size=50)
                phases: dict[str, tuple[float, str]] = {}
                steps = (("worker", worker.run_once), ("dispatcher", dispatcher.run_once))
                for name, step in steps:
                    profiler = Profiler(interval=0.0005) if profile else None
                    started = time.perf_counter()
                    if profiler is not None:
                        profiler.start()
                    while step():
                        pass
                    if profiler is not None:
                        profiler.stop()
                    seconds = time.perf_counter() - started
                    text = (
                        _top(profiler.output_text(unicode=False, color=False, show_all=False))
                        if profiler is not None
                        else ""
                    )
                    phases[name] = (seconds, text)
                    say(f"profile {kind} {name}: {events / seconds:,.0f} events/s")
                dispatcher.close()
            finally:
                engine.dispose()
        if sink.count() < events:
            raise RuntimeError(f"only {sink.count()} of {events} receipts were handed over")
    return {
        "worker_eps": events / phases["worker"][0],
        "dispatcher_eps": events / phases["dispatcher"][0],
        "markdown": markdown(kind, events, phases),
    }


def _top(text: str) -> str:
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if line.lstrip()[:1].isdigit()), 0)
    return "\n".join(lines[start : start + TOP])


def markdown(kind: str, events: int, phases: dict[str, tuple[float, str]]) -> str:
    lines = [
        f"## Profile of the hottest path ({kind}, {events:,} events, one thread, in process)",
        "",
        "Stored events drained by `Worker.run_once()` (claim, `Processor`, complete), then the "
        "outbox by `EffectDispatcher.run_once()` into a local SMTP sink; pyinstrument, top frames.",
        "",
        "| phase | seconds | events/s |",
        "|---|---|---|",
    ]
    for name, (seconds, _) in phases.items():
        lines.append(f"| {name} | {seconds:.2f} | {events / seconds:,.0f} |")
    for name, (_, text) in phases.items():
        if text:
            lines += ["", f"{name}:", "", "```", text, "```"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()
    print(run_profile(args.events, args.database, not args.no_profile)["markdown"])


if __name__ == "__main__":
    main()
