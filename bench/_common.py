"""What the bench modules share: fresh databases, real billhook processes, an SMTP sink, stderr,
the wrk script that sends signed deliveries."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get(
    "BILLHOOK_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
STRIPE_SECRET = "whsec_bench_secret"
_INVOICE = re.compile(rb"in_[0-9a-f]{24}")


def say(*parts: object, sep: str = " ") -> None:
    """Progress goes to stderr, so `--json` keeps stdout for the one JSON object."""
    print(*parts, sep=sep, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], bool], timeout: float, what: str, step: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


@contextmanager
def database(kind: str, scratch: Path) -> Iterator[str]:
    """A fresh, migrated database URL of `kind` ('sqlite' or 'postgresql'), dropped afterwards."""
    from billhook.store.engine import create_engine
    from billhook.store.migrate import upgrade

    if kind == "sqlite":
        url = f"sqlite:///{scratch / f'bench-{uuid.uuid4().hex[:8]}.db'}"
        engine = create_engine(url)
        upgrade(engine)
        engine.dispose()
        yield url
        return
    admin = sa.create_engine(
        PG_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://", 1),
        isolation_level="AUTOCOMMIT",
    )
    name = f"billhook_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = f"{PG_ADMIN_URL.rpartition('/')[0]}/{name}"
    try:
        engine = create_engine(url)
        upgrade(engine)
        engine.dispose()
        yield url
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@dataclass(frozen=True)
class _Process:
    name: str
    parent: int
    cpu_seconds: float  # user + system, all threads, so far


def _process(pid: int | str) -> _Process | None:
    """`pid` from /proc/PID/stat; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name, _, rest = stat.partition(" (")[2].rpartition(") ")
    fields = rest.split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return _Process(name, int(fields[1]), cpu)


def _processes() -> dict[int, _Process]:
    """Every process on this machine."""
    found = {int(e.name): _process(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()}
    return {pid: process for pid, process in found.items() if process is not None}


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, all threads) process `pid` has used so far; 0 once gone."""
    process = _process(pid)
    return 0.0 if process is None else process.cpu_seconds


def tree_cpu_seconds(pid: int) -> float:
    """`cpu_seconds` of `pid` and every process below it (`serve --processes N` children)."""
    processes = _processes()
    tree, grew = {pid}, True
    while grew:
        below = {child for child, p in processes.items() if p.parent in tree} - tree
        tree |= below
        grew = bool(below)
    return sum(processes[member].cpu_seconds for member in tree if member in processes)


def postgres_cpu_seconds() -> float:
    """CPU seconds of every `postgres` process on this machine (the server's backends do the
    database's share of the work; other clients' work would count too)."""
    return sum(p.cpu_seconds for p in _processes().values() if p.name == "postgres")


def _busy_and_total_ticks() -> tuple[int, int]:
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def wait_until_quiet(*, busy_below: float = 0.1, timeout: float = 20.0) -> float:
    """Wait until the machine's CPUs are busy less than `busy_below` of a 0.5 s window, or
    `timeout` passed; returns the last window's busy share.

    After a phase on PostgreSQL its background processes keep writing (checkpoint, autovacuum,
    dropping the database) for seconds; a baseline measured meanwhile cost 72 us of CPU per
    request against 50 on a quiet machine. Each measurement starts from a quiet machine.
    """
    deadline = time.monotonic() + timeout
    while True:
        busy_before, total_before = _busy_and_total_ticks()
        time.sleep(0.5)
        busy_after, total_after = _busy_and_total_ticks()
        share = (busy_after - busy_before) / max(total_after - total_before, 1)
        if share < busy_below or time.monotonic() > deadline:
            return share


def billhook_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLHOOK_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update({"BILLHOOK_LOG_LEVEL": "warning", "BILLHOOK_LOG_FORMAT": "json"})
    env.update(extra)
    return env


@contextmanager
def processes(
    commands: list[list[str]], env: dict[str, str], logs: Path | None = None
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Real child processes (`python -m billhook ...`), stopped with SIGTERM (then SIGKILL).

    With `logs`, each child's stderr goes to `logs/<n>-<command>.log`, shown if the block fails.
    """
    started = []
    paths: list[Path] = []
    for n, command in enumerate(commands):
        err: int | Any = subprocess.DEVNULL
        if logs is not None:
            paths.append(logs / f"{n}-{'-'.join(command)[:40]}.log")
            err = paths[-1].open("wb")
        started.append(
            subprocess.Popen(
                [sys.executable, "-m", *command], env=env, cwd=ROOT,
                stdout=subprocess.DEVNULL, stderr=err,
            )
        )
    try:
        yield started
    except BaseException:
        for path in paths:
            say(f"--- {path.name} (last lines)")
            say(*path.read_text(errors="replace").splitlines()[-15:], sep="\n")
        raise
    finally:
        for process in started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in started:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class SmtpSink:
    """A local SMTP server (aiosmtpd) that accepts everything and stamps each hand-over.

    The handler only appends (time, raw bytes); invoice ids are extracted after the run, so the
    sink costs the measured system as little CPU as possible.
    """

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        self.received: list[tuple[float, bytes]] = []
        self._lock = threading.Lock()
        self.port = free_port()
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        stamp = time.time()
        with self._lock:
            self.received.append((stamp, bytes(envelope.content)))
        await asyncio.sleep(0)
        return "250 OK"

    def count(self) -> int:
        return len(self.received)

    def __enter__(self) -> SmtpSink:
        self._controller.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._controller.stop()

    def first_by_invoice(self) -> dict[str, float]:
        """Invoice id -> when its first message was handed over."""
        seen: dict[str, float] = {}
        with self._lock:
            received = list(self.received)
        for stamp, content in received:
            match = _INVOICE.search(content)
            if match is not None:
                seen.setdefault(match.group().decode(), stamp)
        return seen


class PostfixSink:
    """Postfix's `smtp-sink` (Debian package `postfix`), the SMTP test server written in C for
    load tests: a real SMTP server over TCP that costs the machine almost nothing, unlike
    aiosmtpd (~450 us of CPU per message, a core at 2,000 messages/s on a 2-core machine).

    Each message is dumped to its own file; its modification time is the hand-over stamp. The
    same interface as `SmtpSink`. The files go to tmpfs (/dev/shm) where there is one: on this
    machine's ext4, creating a file per message (in a directory where earlier runs deleted
    thousands) cost the kernel a third of both cores at 1,300 messages/s, charged to no process
    billhook runs, and the pipeline slowed down with it.
    """

    BINARY = "/usr/sbin/smtp-sink"

    def __init__(self) -> None:
        self.port = free_port()
        shm = "/dev/shm"
        scratch = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
        self._dir = Path(tempfile.mkdtemp(prefix="billhook-smtp-sink-", dir=scratch))
        self._process: subprocess.Popen[bytes] | None = None

    @classmethod
    def available(cls) -> bool:
        return Path(cls.BINARY).exists()

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def __enter__(self) -> PostfixSink:
        self._process = subprocess.Popen(
            [self.BINARY, "-u", "root", "-d", f"{self._dir}/m.", f"127.0.0.1:{self.port}", "256"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: _accepts(self.port), 10, "smtp-sink")
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
        shutil.rmtree(self._dir, ignore_errors=True)

    def count(self) -> int:
        return sum(1 for _ in os.scandir(self._dir))

    @property
    def pid(self) -> int | None:
        """Its process (its CPU is not this process's, as aiosmtpd's is)."""
        return None if self._process is None else self._process.pid

    @property
    def received(self) -> list[tuple[float, bytes]]:
        return [
            (entry.stat().st_mtime_ns / 1e9, Path(entry.path).read_bytes())
            for entry in os.scandir(self._dir)
        ]

    def first_by_invoice(self) -> dict[str, float]:
        """Invoice id -> when its first message was handed over."""
        seen: dict[str, float] = {}
        for stamp, content in sorted(self.received):
            match = _INVOICE.search(content)
            if match is not None:
                seen.setdefault(match.group().decode(), stamp)
        return seen


def _accepts(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def write_wrk_requests(path: Path, deliveries: Iterable[tuple[str, bytes]]) -> Path:
    """Write `(Stripe-Signature, body)` deliveries as the raw HTTP requests `wrk_script` sends,
    each preceded by its length on a line of its own. Returns `path`."""
    with path.open("wb") as handle:
        for signature, body in deliveries:
            request = (
                b"POST /webhooks/stripe HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nStripe-Signature: " + signature.encode()
                + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            handle.write(str(len(request)).encode() + b"\n" + request)
    return path


def wrk_script(*, once: bool) -> str:
    """The wrk Lua script that sends the requests `write_wrk_requests` wrote, in order, from
    one wrk thread (`wrk -t1 ... -- FILE`).

    One thread, because wrk runs `init` for one thread after another while the threads already
    started send load: with two threads loading 150k requests each, the first had the server to
    itself for over a second, counted in the run, while the second's loading took a core from
    the server. With one, everything is loaded before the clock starts; one wrk thread sends
    over 70k requests/s here, well above any server measured. The requests are formatted
    beforehand so that loading costs little (wrk.format per request cost ~16 us each).

    wrk calls `request()` once before sending anything, to check the script (its
    `script_verify_request`), and drops what it returns: the script answers that call without
    moving on, so every request is sent. (It used to move on: the pipeline's first event was
    never sent, and the pipeline waited 3 s for it with wrk re-sending a duplicate meanwhile.)

    `once=False` (a run of fixed duration, bench.ingest): the requests are sent round and
    round, and wrk prints `BENCH requests duration_us errors p50_us p99_us max_us` at the end.
    `once=True` (a fixed set of events, bench.pipeline): each is sent once, then `GET /healthz`
    (answered without the database) until wrk is stopped, so that the server's CPU and write
    lock go to nothing but the events while the workers drain them.
    """
    if once:
        return _WRK_REQUESTS.substitute(past_end=_WRK_IDLE)
    return _WRK_REQUESTS.substitute(past_end=_WRK_ROUND) + _WRK_REPORT


_WRK_REQUESTS = string.Template(r"""
local requests = {}
local count = 0
local sent = 0
local verified = false
local idle = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
function init(args)
  local file = assert(io.open(args[1], "rb"))
  local data = file:read("*a")
  file:close()
  local at = 1
  while at <= #data do
    local newline = data:find("\n", at, true)
    local length = tonumber(data:sub(at, newline - 1))
    count = count + 1
    requests[count] = data:sub(newline + 1, newline + length)
    at = newline + length + 1
  end
end
function request()
  if not verified then
    verified = true
    return requests[1]
  end
  sent = sent + 1
  if sent > count then
    $past_end
  end
  return requests[sent]
end
""")
_WRK_ROUND = "sent = 1"
_WRK_IDLE = "return idle"
_WRK_REPORT = r"""
function done(summary, latency, requests)
  io.write(string.format("BENCH %d %d %d %d %d %d\n", summary.requests, summary.duration,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout, latency:percentile(50), latency:percentile(99), latency.max))
end
"""
