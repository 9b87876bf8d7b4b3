"""Log lines: one JSON object per line with an ISO 8601 UTC timestamp, or a console line."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator

import orjson
import pytest
import structlog

from billhook.config import Settings
from billhook.observability import configure_logging, get_logger

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def test_json_line_has_level_event_fields_and_utc_timestamp(
    capfd: pytest.CaptureFixture[str],
) -> None:
    configure_logging(Settings(log_format="json", log_level="info"))
    before = dt.datetime.now(dt.UTC)
    get_logger("test").info("webhook stored", source="stripe", event_id="evt_1")
    after = dt.datetime.now(dt.UTC)

    line = capfd.readouterr().err.strip().splitlines()[-1]
    record = orjson.loads(line)
    assert record["event"] == "webhook stored"
    assert record["level"] == "info"
    assert (record["source"], record["event_id"]) == ("stripe", "evt_1")
    assert ISO_UTC.match(record["timestamp"]), record["timestamp"]
    stamped = dt.datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00"))
    # Microseconds are truncated (a float's last digit may fall one below).
    assert before - dt.timedelta(microseconds=1) <= stamped <= after


def test_timestamps_follow_the_clock_across_seconds(capfd: pytest.CaptureFixture[str]) -> None:
    """The date and time part is cached per second: consecutive lines must still be ordered
    and each must match the wall clock."""
    configure_logging(Settings(log_format="json", log_level="info"))
    log = get_logger("test")
    deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1.2)
    count = 0
    while dt.datetime.now(dt.UTC) < deadline:  # crosses at least one second boundary
        log.info("tick", n=count)
        count += 1
    stamps = [
        dt.datetime.fromisoformat(orjson.loads(line)["timestamp"].replace("Z", "+00:00"))
        for line in capfd.readouterr().err.strip().splitlines()
    ]
    assert len(stamps) == count
    assert stamps == sorted(stamps)
    assert len({stamp.second for stamp in stamps}) >= 2


def test_below_the_level_nothing_is_written(capfd: pytest.CaptureFixture[str]) -> None:
    configure_logging(Settings(log_format="json", log_level="warning"))
    get_logger("test").info("quiet")
    get_logger("test").warning("loud")
    lines = capfd.readouterr().err.strip().splitlines()
    assert [orjson.loads(line)["event"] for line in lines] == ["loud"]


def test_console_line_carries_the_timestamp(capfd: pytest.CaptureFixture[str]) -> None:
    configure_logging(Settings(log_format="console", log_level="info"))
    get_logger("test").info("hello", answer=42)
    line = capfd.readouterr().err.strip().splitlines()[-1]
    timestamp, rest = line.split(" ", 1)
    assert ISO_UTC.match(timestamp), line
    assert "hello" in rest and "answer=42" in rest
