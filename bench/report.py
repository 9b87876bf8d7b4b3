"""The benchmark report: where and how it ran, the headline figures, then each module's section."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import sqlite3
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench._common import PG_ADMIN_URL

PACKAGES = (
    "sqlalchemy", "psycopg", "uvicorn", "starlette", "orjson", "aiosmtpd", "pgqueuer",
    "procrastinate", "pyinstrument",
)
# The targets, for the summary table: key -> (what, how to judge).
TARGETS = {
    "ingest_rps_sqlite": "durable ingest, SQLite (>= 50% of ceiling_rps)",
    "ingest_rps_postgres": "durable ingest, PostgreSQL (>= 40% of ceiling_rps)",
    "pipeline_eps_sqlite": "pipeline events/s, SQLite (>= 2,000)",
    "queue_jps_postgres": "queue jobs/s, PostgreSQL (>= 1.5 x pgqueuer_jps_postgres)",
    "replay_eps": "replay events/s (>= 5,000)",
    "rss_growth_pct": "worker RSS change, checkpoints (full: 100k -> 1M events; +-10%)",
    "dispatcher_rss_growth_pct": "dispatcher RSS change between its two checkpoints (within +-10%)",
}


def environment() -> dict[str, Any]:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = "?"
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    versions = {"Python": platform.python_version(), "SQLite": sqlite3.sqlite_version,
                "PostgreSQL": _postgres_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.system()} {platform.release()}, {os.cpu_count()} CPU ({cpu}), "
        f"{memory} RAM",
        "versions": versions,
        "load_before": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def _postgres_version() -> str:
    try:
        engine = sa.create_engine(PG_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://", 1))
        with engine.connect() as connection:
            version = str(connection.exec_driver_sql("SHOW server_version").scalar_one())
        engine.dispose()
        return version
    except Exception as exc:  # the report still says why there is no figure
        return f"unavailable ({type(exc).__name__})"


def write_report(
    path: Path,
    env: dict[str, Any],
    command: str,
    figures: dict[str, Any],
    sections: list[tuple[str, str]],
) -> None:
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    lines = [
        "# Benchmark results",
        "",
        "Written by `make bench` (`python -m bench`); every figure below comes from this one run "
        "on this one machine, so compare rows with each other, not with other machines.",
        "",
        f"- date: {env['started']} (finished {env.get('finished', '?')})",
        f"- machine: {env['machine']}",
        f"- load average (1, 5, 15 min): before {env['load_before']}, after "
        f"{env.get('load_after', '?')} — other work shared this 2-core machine",
        f"- versions: {versions}",
        f"- command: `{command}`",
        "",
        "## Summary",
        "",
        "| figure | value | target |",
        "|---|---|---|",
    ]
    for key, value in figures.items():
        if isinstance(value, int | float | str):
            shown = str(value)
            if isinstance(value, float):
                shown = f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
            lines.append(f"| `{key}` | {shown} | {TARGETS.get(key, '')} |")
    for _, text in sections:
        lines += ["", text.strip()]
    path.write_text("\n".join(lines) + "\n")
