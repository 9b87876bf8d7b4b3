"""Pipeline benchmark: signed deliveries over HTTP -> state applied -> email handed to SMTP.

    .venv/bin/python -m bench.pipeline [--events 20000] [--workers 2] [--skip-postgres]

Real processes, as `billhook run` starts them: one `billhook serve` and `--workers`
`billhook worker` (with its effect dispatcher) against one fresh database, mail to a local
SMTP sink (Postfix's `smtp-sink` when installed, else aiosmtpd in this process). wrk sends
`--events` unique signed `invoice.paid` events (each a new invoice, so each must end in exactly
one payment receipt) over 32 connections, as fast as the server answers. The clock starts when
wrk starts and stops at the last receipt handed over.

- events/s: events / (last hand-over - start); the ingest and drain phases are shown apart;
- latency: per invoice, from `events.received_at` (stamped when the delivery arrives, before its
  commit and its 2xx: an upper bound on 2xx -> hand-off by the ingest latency) to the moment
  the sink received its receipt. p50 / p99.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import sqlalchemy as sa

from bench._common import (
    STRIPE_SECRET,
    PostfixSink,
    SmtpSink,
    billhook_env,
    cpu_seconds,
    database,
    free_port,
    percentile,
    postgres_cpu_seconds,
    processes,
    say,
    wait_for,
    wait_until_quiet,
    write_wrk_requests,
    wrk_script,
)
from bench._events import paid_bodies, signed

CONNECTIONS = 32
NOTES = """

### Reading these figures

- Every process shares the same 2 cores. The last column is CPU per event for each process kind
  over the whole run: their sum caps the run near 2 cores / that sum, before any waiting.
- Workers apply a claimed batch in one transaction (`billhook.applying`) and dispatch mail in
  batches of up to 200 on one SMTP connection (three commits per batch; when the server offers
  PIPELINING, as smtp-sink does, one round trip a message: its content goes out with the next
  message's MAIL, RCPT and DATA). `batch_sizes` (in the JSON)
  is the mean rows per transaction: jobs per claim and per completion, effects per claim.
- On SQLite the workers' batch transactions and the ingest group commits take turns at the one
  write lock, so ingest runs slower here than alone (ingest table). Every SQLite write
  transaction waits for its turn in the kernel (`billhook.store.write_turns`): before
  2026-11-26 the workers waited in SQLite's busy handler, whose naps grow to 100 ms however
  soon the lock is free, and the drain lagged ingest by seconds (p50 latency 1.3-3.6 s; now
  ~0.1 s). The ingest writer gathers what arrived while it waited into that same commit.
- On SQLite the write lock, more than the CPU, bounds this run. Timing each thread's hold of
  it (2026-11-26, 10,000 events) found it held nearly all the time: the workers' batch
  transactions about 0.3 ms per event, the dispatchers 0.14, the fetchers 0.08, then ingest's
  commits. Since then a worker's batch reads its events and invoices and runs the model before
  its transaction (`Processor.prepare`; the writes are version-checked), so a batch holds the
  lock 6.4-6.8 ms instead of 11.5-12.5: interleaved pairs gave 1,710 / 1,824 / 1,845 / 1,855
  events/s before and 1,925 / 2,156 / 2,217 / 1,858 after (PostgreSQL 1,266 -> 1,439).
- wrk sends every event once, then `GET /healthz` until it is stopped. Until 2026-11-26 its
  script lost the first event to wrk's own check of the script, and re-sent the last delivery
  meanwhile: each run ended with 3 s of duplicates, counted in serve's CPU (0.45 ms per event
  at 10,000 events; 0.16-0.20 since).
- The SMTP sink writes each message to a file on tmpfs: on this machine's ext4 the file
  creations (in a directory where earlier runs deleted thousands) cost the kernel a third of
  both cores, in no billhook process, and the pipeline ran ~30% slower.
- The PostgreSQL column is every `postgres` process's CPU: the database's share of the work.
  Each run starts on a fresh database, the case where PostgreSQL has no column statistics
  until autovacuum's first ANALYZE (at most once a minute): until 2026-11-26 the claim was then
  planned to test and sort every waiting job, and runs where autovacuum came late gave 158-293
  events/s at 5-11 ms of PostgreSQL CPU per event. Workers now ANALYZE the queue's tables
  once half of one changed (`billhook.store.planner_statistics`): 1,112-1,461 events/s in
  four runs, 0.65-0.79 ms.
- `failed_attempts` (in the JSON) counts retried job attempts by error type; a healthy run
  has none."""


@dataclass
class PipelineResult:
    database: str
    events: int
    workers: int
    seconds: float
    ingest_seconds: float
    events_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    receipts: int
    duplicates_sent: int
    # CPU seconds per 1,000 events spent by each process kind over the run (2 cores = 2 s/s).
    cpu_ms_per_event: dict[str, float]
    failed_attempts: dict[str, int]
    sink: str
    # Mean rows per transaction: jobs per claim round and per completion commit, effects per
    # dispatcher claim (fixed costs per transaction are paid once per batch).
    batch_sizes: dict[str, float]


def run(
    kind: str, events: int, workers: int, scratch: Path, concurrency: int | None = None
) -> PipelineResult:
    if shutil.which("wrk") is None:
        raise RuntimeError("bench.pipeline needs wrk (Debian package `wrk`)")
    scratch.mkdir(parents=True, exist_ok=True)
    now = int(time.time())
    invoice_ids: list[str] = []
    deliveries = []
    for invoice_id, body in paid_bodies(events, now):
        invoice_ids.append(invoice_id)
        deliveries.append((signed(body, now), body))
    requests = write_wrk_requests(scratch / f"pipeline-{kind}.txt", deliveries)
    script = scratch / "pipeline.lua"
    script.write_text(wrk_script(once=True))
    port = free_port()
    sink_type = PostfixSink if PostfixSink.available() else SmtpSink
    with sink_type() as sink, database(kind, scratch) as url:
        env = billhook_env(
            BILLHOOK_DATABASE_URL=url,
            BILLHOOK_STRIPE_WEBHOOK_SECRETS=STRIPE_SECRET,
            BILLHOOK_SMTP_URL=sink.url,
            BILLHOOK_DATA_DIR=str(scratch),
            BILLHOOK_PORT=str(port),
        )
        worker = ["billhook", "worker"] + ([f"--concurrency={concurrency}"] if concurrency else [])
        commands = [["billhook", "serve"]] + [worker] * workers
        engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
        try:
            with processes(commands, env, logs=scratch) as children:
                base = f"http://127.0.0.1:{port}"
                wait_for(lambda: _ready(base), 60, "billhook serve")
                time.sleep(1.0)  # workers import and connect; idle start-up is not measured
                wait_until_quiet()  # nor what the previous phase left running (PostgreSQL)
                started = time.time()
                sink_pid = getattr(sink, "pid", None)
                cpu_before = _cpu(children), resource.getrusage(resource.RUSAGE_SELF)
                sink_before = cpu_seconds(sink_pid) if sink_pid else 0.0
                postgres_before = postgres_cpu_seconds() if kind == "postgresql" else 0.0
                wrk = subprocess.Popen(
                    ["wrk", "-t1", f"-c{CONNECTIONS}", "-d600s", "--timeout", "10s",
                     "-s", str(script), base, "--", str(requests)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                try:
                    stored, ingested = _wait_stored(engine, events)
                finally:
                    wrk_cpu = _cpu([wrk])[0]
                    wrk.send_signal(signal.SIGINT)
                    wrk.wait(timeout=30)
                wait_for(lambda: sink.count() >= stored, 300, "receipts", step=0.05)
                cpu_after = _cpu(children), resource.getrusage(resource.RUSAGE_SELF)
                sink_after = cpu_seconds(sink_pid) if sink_pid else 0.0
                postgres_after = postgres_cpu_seconds() if kind == "postgresql" else 0.0
                time.sleep(0.5)  # a late duplicate would show here
            latencies = _latencies(engine, sink.first_by_invoice(), set(invoice_ids))
            retried = _failed_attempts(engine)
            batch_sizes = _batch_sizes(engine)
        finally:
            engine.dispose()
        last = max(stamp for stamp, _ in sink.received)
        seconds = last - started
        spent = [after - before for before, after in zip(cpu_before[0], cpu_after[0], strict=True)]
        # aiosmtpd runs in this process; Postfix's smtp-sink is a process of its own.
        own = sum(
            getattr(cpu_after[1], f) - getattr(cpu_before[1], f) for f in ("ru_utime", "ru_stime")
        )
        sink_cpu = sink_after - sink_before if sink_pid else own
        cpu = {
            "serve": spent[0],
            "workers": sum(spent[1:]),
            "sink": sink_cpu,
            "wrk": wrk_cpu,
            "postgres": postgres_after - postgres_before,
        }
        return PipelineResult(
            database=kind,
            events=stored,
            workers=workers,
            seconds=seconds,
            ingest_seconds=ingested - started,
            events_per_s=stored / seconds,
            latency_p50_ms=percentile(latencies, 0.5),
            latency_p99_ms=percentile(latencies, 0.99),
            receipts=len(latencies),
            duplicates_sent=sink.count() - len(latencies),
            cpu_ms_per_event={name: round(1000 * value / stored, 3) for name, value in cpu.items()},
            failed_attempts=retried,
            batch_sizes=batch_sizes,
            sink="postfix smtp-sink" if sink_type is PostfixSink else "aiosmtpd",
        )


def _cpu(children: list[subprocess.Popen[bytes]]) -> list[float]:
    """CPU seconds (user + system, all threads) each process has used so far."""
    return [cpu_seconds(child.pid) for child in children]


def _wait_stored(engine: sa.engine.Engine, events: int) -> tuple[int, float]:
    """Until every event is stored, or none more arrive for 3 s (a delivery lost on the way:
    the report then shows fewer events than sent); returns how many were stored and when the
    last one was seen."""
    last, changed = -1, time.monotonic()
    deadline = changed + 300
    while time.monotonic() < deadline:
        count = _stored(engine)
        if count >= events:
            return count, time.time()
        if count != last:
            last, changed = count, time.monotonic()
        elif count and time.monotonic() - changed > 3:
            return count, time.time() - (time.monotonic() - changed)
        time.sleep(0.05)
    raise RuntimeError(f"ingest stalled at {last} of {events} events")


def _ready(base: str) -> bool:
    try:
        return httpx.get(base + "/readyz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _stored(engine: sa.engine.Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(sa.text("SELECT count(*) FROM events")).scalar_one())


def _failed_attempts(engine: sa.engine.Engine) -> dict[str, int]:
    """Job attempts that failed (and were retried), by error type: a healthy run has none."""
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT error_type, count(*) FROM job_attempts WHERE outcome = 'failed' "
                "GROUP BY error_type"
            )
        )
        return {str(kind): int(count) for kind, count in rows}


def _batch_sizes(engine: sa.engine.Engine) -> dict[str, float]:
    """Rows per transaction, from the timestamps each one stamps on all of its rows."""
    queries = {
        "jobs_per_claim": "SELECT count(*), count(DISTINCT started_at) FROM job_attempts",
        "jobs_per_completion": "SELECT count(*), count(DISTINCT finished_at) FROM job_attempts",
        "effects_per_claim": "SELECT count(*), count(DISTINCT started_at) FROM effect_attempts",
    }
    sizes = {}
    with engine.connect() as connection:
        for name, query in queries.items():
            rows, transactions = connection.execute(sa.text(query)).one()
            sizes[name] = round(rows / transactions, 1) if transactions else 0.0
    return sizes


def _latencies(
    engine: sa.engine.Engine, handed: dict[str, float], expected: set[str]
) -> list[float]:
    with engine.connect() as connection:
        arrived = dict(
            (row[0], row[1])
            for row in connection.execute(sa.text("SELECT ordering_key, received_at FROM events"))
        )
    return [
        (handed[invoice] - float(arrived[invoice])) * 1000
        for invoice in expected
        if invoice in handed and invoice in arrived
    ]


def run_pipeline_bench(
    events: int, workers: int = 2, postgres: bool = True, concurrency: int | None = None
) -> dict[str, object]:
    """Both databases; returns the JSON keys and a markdown section."""
    results: list[PipelineResult] = []
    with tempfile.TemporaryDirectory(prefix="billhook-pipeline-") as tmp:
        for kind in ("sqlite", "postgresql") if postgres else ("sqlite",):
            say(f"pipeline: {kind}, {events} events, {workers} worker process(es)")
            results.append(run(kind, events, workers, Path(tmp) / kind, concurrency))
            say("  ", asdict(results[-1]))
    by_kind = {r.database: r for r in results}
    out: dict[str, object] = {
        "pipeline_eps_sqlite": round(by_kind["sqlite"].events_per_s, 1),
        "pipeline_p99_ms_sqlite": round(by_kind["sqlite"].latency_p99_ms, 1),
        "markdown": markdown(results),
        "results": [asdict(r) for r in results],
    }
    if "postgresql" in by_kind:
        out["pipeline_eps_postgres"] = round(by_kind["postgresql"].events_per_s, 1)
        out["pipeline_p99_ms_postgres"] = round(by_kind["postgresql"].latency_p99_ms, 1)
    return out


def markdown(results: list[PipelineResult]) -> str:
    lines = [
        "## Pipeline: HTTP -> state -> email handed to SMTP",
        "",
        "One `billhook serve` + N `billhook worker` processes (each with its effect dispatcher), "
        f"a local SMTP sink ({', '.join(sorted({r.sink for r in results}))}: Postfix's C test "
        "server when the `postfix` package is installed, else aiosmtpd, which alone costs ~0.5 ms "
        "of CPU per message on this machine); wrk sends unique signed `invoice.paid` events over "
        f"{CONNECTIONS} connections; each must end in exactly one receipt. events/s = events / "
        "(last hand-over - wrk start). Latency: `received_at` (arrival, before the 2xx) -> "
        "hand-over, per invoice.",
        "",
        "| database | workers | events | ingest s | total s | events/s | p50 ms | p99 ms "
        "| receipts | extra mails | CPU ms/event: serve, workers, SMTP sink, wrk, PostgreSQL |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.database} | {r.workers} | {r.events:,} | {r.ingest_seconds:.1f} | "
            f"{r.seconds:.1f} | {r.events_per_s:,.0f} | {r.latency_p50_ms:,.0f} | "
            f"{r.latency_p99_ms:,.0f} | {r.receipts:,} | {r.duplicates_sent} | "
            + ", ".join(
                "-" if name == "postgres" and r.database != "postgresql" else f"{value:.2f}"
                for name, value in r.cpu_ms_per_event.items()
            )
            + " |"
        )
    return "\n".join(lines) + NOTES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument(
        "--concurrency", type=int, default=None, help="executor threads per worker (default: its)"
    )
    args = parser.parse_args()
    out = run_pipeline_bench(args.events, args.workers, not args.skip_postgres, args.concurrency)
    print(out["markdown"])


if __name__ == "__main__":
    main()
