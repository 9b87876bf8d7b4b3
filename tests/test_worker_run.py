"""`billhook run`: migrates, serves the API, runs workers, and stops as one process tree."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from billhook.queue.jobs import enqueue
from billhook.store.engine import create_engine, transaction


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        text = (task / "children").read_text() if (task / "children").exists() else ""
        found.update(int(child) for child in text.split())
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_run_serves_processes_and_stops_cleanly(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'billhook.db'}"  # fresh: `run` creates and migrates it
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLHOOK_")}
    env.update(
        BILLHOOK_DATABASE_URL=url, BILLHOOK_PORT=str(port), BILLHOOK_WORKERS="2",
        BILLHOOK_SHUTDOWN_GRACE_SECONDS="2", BILLHOOK_LOG_LEVEL="warning",
        BILLHOOK_DATA_DIR=str(tmp_path / "data"),
    )
    parent = subprocess.Popen([sys.executable, "-m", "billhook", "run"], env=env)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert parent.poll() is None, "billhook run exited early"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the API never came up"
            time.sleep(0.1)
        children = _children(parent.pid)
        assert len(children) == 3  # the API and two workers
        engine = create_engine(url)
        with transaction(engine) as connection:
            job_id = enqueue(connection, ordering_key="k", order_ts=1.0, now=time.time(),
                             max_attempts=3)
        deadline = time.monotonic() + 60
        while True:
            with engine.connect() as connection:
                state = connection.exec_driver_sql(
                    f"SELECT state FROM jobs WHERE id = {job_id}").scalar()
            if state == "completed":
                break
            assert time.monotonic() < deadline, f"job still {state}"
            time.sleep(0.05)
        engine.dispose()
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == 0
        assert not any(_alive(pid) for pid in children)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
