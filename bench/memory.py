"""Memory benchmark: resident memory of a `billhook worker` process as it processes events.

    .venv/bin/python -m bench.memory [--small 100000] [--large 1000000] [--database sqlite]

One real `billhook worker` (with its effect dispatcher; mail to a local SMTP sink) on a fresh
database; this process keeps a backlog of stored events and jobs in front of it (seeded as ingest
stores them, in group commits) and reads the worker's VmRSS from /proc when the count of
processed events passes `--small` and `--large`. Flat means the two are within 10%.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import sqlalchemy as sa

from bench._common import SmtpSink, billhook_env, database, processes, rss_mb, say
from bench._events import seed
from billhook.store.engine import create_engine

BACKLOG = 2000
CHUNK = 1000


@dataclass
class MemoryResult:
    database: str
    small: int
    large: int
    rss_mb_small: float
    rss_mb_large: float
    seconds: float

    @property
    def growth(self) -> float:
        return self.rss_mb_large / self.rss_mb_small - 1


def run(kind: str, small: int, large: int, scratch: Path) -> MemoryResult:
    with SmtpSink() as sink, database(kind, scratch) as url:
        engine = create_engine(url)
        env = billhook_env(
            BILLHOOK_DATABASE_URL=url, BILLHOOK_SMTP_URL=sink.url, BILLHOOK_DATA_DIR=str(scratch)
        )
        try:
            with processes([["billhook", "worker"]], env, logs=scratch) as (worker,):
                seeded, samples = 0, {}
                started = time.monotonic()
                for checkpoint in (small, large):
                    while True:
                        done = _processed(engine)
                        if done >= checkpoint:
                            samples[checkpoint] = rss_mb(worker.pid)
                            say(f"memory: {done:,} events processed, worker RSS "
                                f"{samples[checkpoint]:.1f} MB")
                            break
                        if worker.poll() is not None:
                            raise RuntimeError("the worker exited during the memory benchmark")
                        if seeded - done < BACKLOG and seeded < large:
                            count = min(CHUNK, large - seeded)
                            seed(engine, count)
                            seeded += count
                        else:
                            time.sleep(0.05)
                seconds = time.monotonic() - started
        finally:
            engine.dispose()
    return MemoryResult(kind, small, large, samples[small], samples[large], seconds)


def _processed(engine: sa.engine.Engine) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                sa.text("SELECT count(*) FROM events WHERE processed_at IS NOT NULL")
            ).scalar_one()
        )


def run_memory_bench(small: int, large: int, kind: str = "sqlite") -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="billhook-memory-") as tmp:
        result = run(kind, small, large, Path(tmp))
    say("  ", asdict(result))
    return {
        "rss_mb_after_load": round(result.rss_mb_large, 1),
        "rss_mb_small": round(result.rss_mb_small, 1),
        "rss_growth_pct": round(100 * result.growth, 1),
        "rss_checkpoints": [small, large],
        "markdown": markdown(result),
    }


def markdown(r: MemoryResult) -> str:
    verdict = "flat (within 10%)" if abs(r.growth) <= 0.10 else "NOT flat (over 10%)"
    return "\n".join(
        [
            "## Memory: worker RSS as events are processed",
            "",
            f"One `billhook worker` process (with its dispatcher, SMTP sink) on {r.database}; "
            f"a backlog of about {BACKLOG:,} stored events kept in front of it. RSS from "
            "/proc/PID/status.",
            "",
            "| database | events processed | RSS MB | events processed | RSS MB | change | "
            "seconds |",
            "|---|---|---|---|---|---|---|",
            f"| {r.database} | {r.small:,} | {r.rss_mb_small:.1f} | {r.large:,} | "
            f"{r.rss_mb_large:.1f} | {100 * r.growth:+.1f}% | {r.seconds:.0f} |",
            "",
            f"- {verdict}.",
            *(
                []
                if (r.small, r.large) == (100_000, 1_000_000)
                else [
                    f"- The issue's pair is 100,000 / 1,000,000 events; this run used "
                    f"{r.small:,} / {r.large:,} (at this machine's worker rate the full pair takes "
                    "hours: `python -m bench.memory` runs it)."
                ]
            ),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    args = parser.parse_args()
    print(run_memory_bench(args.small, args.large, args.database)["markdown"])


if __name__ == "__main__":
    main()
