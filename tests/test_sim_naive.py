"""The simulator can fail: against the naive demo receiver it reports violations, exit code 1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

ROOT = Path(__file__).resolve().parents[1]
BILLHOOK = Path(sys.executable).with_name("billhook")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def naive(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {
        **os.environ,
        "BILLHOOK_PORT": str(_free_port()),
        "BILLHOOK_SMTP_URL": f"smtp://127.0.0.1:{_free_port()}",
        "BILLHOOK_STRIPE_WEBHOOK_SECRETS": "whsec_naive_test",
        "NAIVE_DB": str(tmp_path / "naive.db"),
    }
    process = subprocess.Popen([sys.executable, str(ROOT / "bench" / "naive_receiver.py")], env=env)
    url = f"http://127.0.0.1:{env['BILLHOOK_PORT']}"
    deadline = time.monotonic() + 20
    try:
        while True:
            try:
                httpx.get(f"{url}/api/v1/invoices/in_none", timeout=1)
                break
            except httpx.TransportError:
                assert process.poll() is None, "the naive receiver exited"
                assert time.monotonic() < deadline, "the naive receiver did not start"
                time.sleep(0.1)
        yield {**env, "TARGET": url}
    finally:
        process.kill()
        process.wait()


def test_the_naive_receiver_fails_the_simulation(naive: dict[str, str]) -> None:
    smtp_port = naive["BILLHOOK_SMTP_URL"].rsplit(":", 1)[1]
    result = subprocess.run(
        [
            str(BILLHOOK),
            "simulate",
            "--target",
            naive["TARGET"],
            "--smtp-port",
            smtp_port,
            "--invoices",
            "25",
            "--seed",
            "42",
            "--duplicates",
            "0.3",
            "--reorder",
            "--concurrency",
            "4",
            "--converge-timeout",
            "3",
            "--json",
        ],
        env=naive,
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr.decode()
    report = orjson.loads(result.stdout)
    assert not report["ok"]
    assert report["duplicate_effects"] > 0
    assert report["wrong_states"] > 0
    assert report["never_acknowledged"] == 0  # it does answer 200: that is the trap
    assert report["acknowledged_2xx"] == report["deliveries_sent"]
