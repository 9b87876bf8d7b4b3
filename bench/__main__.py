"""The whole benchmark suite: `make bench` (= `python -m bench`) rewrites bench/RESULTS.md.

    .venv/bin/python -m bench                 # full suite, rewrites bench/RESULTS.md
    .venv/bin/python -m bench --quick --json  # small sizes, one JSON object on stdout

Each bench module returns a dict of figures plus its own markdown section (`"markdown"`); this
module runs them in one process tree, one after the other, and writes the report (machine,
date, load, versions, command, then the sections). Progress goes to stderr. Benchmarks need
PostgreSQL at 127.0.0.1:5432 (user postgres; BILLHOOK_BENCH_POSTGRES_URL to change it); each
creates and drops its own databases. Run under `flock /tmp/billhook-bench.lock` on a shared
machine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from bench._common import ROOT, say
from bench.report import environment, write_report

Section = Callable[[], dict[str, Any]]


def _ingest(quick: bool) -> dict[str, Any]:
    from bench import ingest

    result: dict[str, Any] = ingest.run_ingest_bench(duration=3.0 if quick else 6.0, quick=quick)
    section = getattr(ingest, "markdown", None)
    if callable(section):
        result["markdown"] = section(result)
    else:
        result["markdown"] = _ingest_markdown(result, getattr(ingest, "NOTES", ""))
    for key in ("rows", "table", "profile_top", "load_average", "date"):
        result.pop(key, None)
    return result


def _ingest_markdown(result: dict[str, Any], notes: str) -> str:
    lines = [
        "## Ingest: signed deliveries, durably stored before the 2xx",
        "",
        f"- load generator: {result.get('client')}; `billhook serve` processes: "
        f"{result.get('server_processes')}",
        "",
        str(result.get("table", "")),
        "",
    ]
    for key, label in (("sqlite", "SQLite"), ("postgres", "PostgreSQL")):
        if f"ingest_ratio_{key}" in result:
            lines.append(
                f"- billhook, {label}, 32 connections: "
                f"{100 * result[f'ingest_ratio_{key}']:.0f}% of the ceiling, "
                f"p99 {result[f'ingest_p99_ms_{key}']:.1f} ms"
            )
    lines.append(f"- duplicate cost (CPU per duplicate / CPU per new event, worst database): "
                 f"{result.get('duplicate_cost_ratio')}; time per duplicate / time per new "
                 f"event: {result.get('duplicate_time_ratio')}")
    if result.get("profile_top"):
        lines += ["", "Profile (py-spy, SQLite, 32 connections):", "", "```",
                  *result["profile_top"], "```"]
    if notes:
        lines += ["", notes.replace("## Reading these figures", "### Reading these figures")]
    return "\n".join(lines)


def _pipeline(quick: bool) -> dict[str, Any]:
    from bench.pipeline import run_pipeline_bench

    return run_pipeline_bench(events=1000 if quick else 10000)


def _queue(quick: bool) -> dict[str, Any]:
    from bench.queue import run_queue_bench

    return run_queue_bench(jobs=1000 if quick else 5000, latency_jobs=50 if quick else 200,
                           quick=quick)


def _replay(quick: bool) -> dict[str, Any]:
    from bench.replay import run_replay_bench

    return run_replay_bench(events=1000 if quick else 5000, postgres=not quick)


def _memory(quick: bool) -> dict[str, Any]:
    from bench.memory import run_memory_bench

    mode = "quick" if quick else "full"
    small, large = MEMORY_EVENTS[mode]
    emails, budget = MEMORY_EMAILS[mode]
    return run_memory_bench(small, large, emails=emails, dispatch_budget=budget)


# Worker RSS is read after `small` and after `large` events processed. The pair is
# 100k / 1M (about 15 minutes here); --quick keeps a short version. `--memory-events SMALL,LARGE`
# changes it (the report says which pair ran).
MEMORY_EVENTS = {"quick": (5_000, 25_000), "full": (100_000, 1_000_000)}
# Then the dispatcher alone: its RSS after this many emails handed over, within a time budget (s).
MEMORY_EMAILS = {"quick": ((1_000, 5_000), 30.0), "full": ((10_000, 50_000), 300.0)}


def _profile(quick: bool) -> dict[str, Any]:
    from bench.profile import run_profile

    return run_profile(events=500 if quick else 3000)


SECTIONS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "ingest": _ingest,
    "pipeline": _pipeline,
    "queue": _queue,
    "replay": _replay,
    "memory": _memory,
    "profile": _profile,
}


def _run_sections(
    names: list[str], quick: bool
) -> tuple[dict[str, Any], list[tuple[str, str]], dict[str, str]]:
    figures: dict[str, Any] = {}
    sections: list[tuple[str, str]] = []
    failures: dict[str, str] = {}
    for name in names:
        say(f"== {name}")
        started = time.monotonic()
        try:
            with contextlib.redirect_stdout(sys.stderr):  # stdout is for the JSON object
                result = SECTIONS[name](quick)
            say(f"== {name}: {time.monotonic() - started:.0f} s")
        except Exception as exc:
            say(f"{name} failed: {type(exc).__name__}: {exc}")
            failures[name] = f"{type(exc).__name__}: {exc}"
            sections.append((name, f"## {name}\n\nFailed in this run: `{failures[name]}`"))
            continue
        sections.append((name, str(result.pop("markdown", ""))))
        result.pop("results", None)
        figures.update(result)
    return figures, sections, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (about a minute)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--only", action="append", choices=tuple(SECTIONS), help="repeatable")
    parser.add_argument("--no-write", action="store_true", help="leave bench/RESULTS.md alone")
    parser.add_argument("--memory-events", help="SMALL,LARGE events processed for the RSS pair")
    args = parser.parse_args()
    if args.memory_events:
        small, large = (int(x) for x in args.memory_events.split(","))
        MEMORY_EVENTS["quick" if args.quick else "full"] = (small, large)
    os.chdir(ROOT)
    env = environment()
    say(f"bench: load average before the run {env['load_before']}")
    # Children inherit file descriptor 1: point it at stderr until the JSON object is printed.
    saved_stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        figures, sections, failures = _run_sections(args.only or list(SECTIONS), args.quick)
    finally:
        sys.stdout.flush()
        os.dup2(saved_stdout, 1)
        os.close(saved_stdout)
    env["load_after"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    env["finished"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = "python -m bench " + " ".join(sys.argv[1:])
    if not args.no_write and not args.quick:
        write_report(ROOT / "bench" / "RESULTS.md", env, command.strip(), figures, sections)
    elif not args.no_write:
        # A quick run is a smoke test: its report goes beside the real one, not over it.
        path = Path(tempfile.gettempdir()) / "billhook-bench-quick.md"
        write_report(path, env, command.strip(), figures, sections)
        say(f"quick report written to {path}")
    if args.json:
        payload = {**figures, "quick": args.quick, "load_before": env["load_before"],
                   "load_after": env["load_after"], "failures": failures}
        sys.stdout.write(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS).decode() + "\n")
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
