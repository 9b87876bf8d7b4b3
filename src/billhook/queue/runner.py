"""`billhook run` as one process tree: the API and N workers as child processes, supervised.

The parent only supervises: a child that exits on its own is started again (after a pause, so a
crash loop does not spin); SIGTERM or SIGINT to the parent is passed to every child, which
shuts down gracefully (workers finish or release their jobs), and children still alive after
the grace period are killed. The parent then exits 0.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType

from billhook.observability import get_logger

_log = get_logger(__name__)

RESTART_DELAY_SECONDS = 1.0


@dataclass(frozen=True)
class ChildSpec:
    name: str
    argv: list[str]


def billhook_command(*args: str) -> list[str]:
    """The argv that runs `billhook ARGS...` with this interpreter."""
    return [sys.executable, "-m", "billhook", *args]


def run_tree(children: Sequence[ChildSpec], *, grace_seconds: float) -> int:
    """Start every child, keep them running until SIGTERM/SIGINT, stop them; returns 0."""
    stopping = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        _log.info("run_stopping", signal=signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    running = {spec.name: _start(spec) for spec in children}
    restart_at: dict[str, float] = {}
    while not stopping.wait(timeout=0.2):
        for spec in children:
            process = running[spec.name]
            code = process.poll()
            if code is None:
                continue
            now = time.monotonic()
            if spec.name not in restart_at:
                _log.error("child_exited", child=spec.name, pid=process.pid, code=code)
                restart_at[spec.name] = now + RESTART_DELAY_SECONDS
            elif now >= restart_at[spec.name]:
                del restart_at[spec.name]
                running[spec.name] = _start(spec)
    _stop_all(list(running.values()), grace_seconds)
    return 0


def _start(spec: ChildSpec) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(spec.argv)
    _log.info("child_started", child=spec.name, pid=process.pid)
    return process


def _stop_all(processes: list[subprocess.Popen[bytes]], grace_seconds: float) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    # Workers take up to their own grace, then release; allow a little more before killing.
    deadline = time.monotonic() + grace_seconds + 5.0
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            _log.error("child_killed", pid=process.pid)
            process.kill()
            process.wait()
