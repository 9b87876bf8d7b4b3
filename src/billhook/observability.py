"""Structured logs (structlog) and the Prometheus registry every component records into."""

from __future__ import annotations

import logging
import sys

import orjson
import structlog

from billhook.config import Settings


def configure_logging(config: Settings) -> None:
    level = getattr(logging, config.log_level.upper(), logging.INFO)
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        if config.log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def _orjson_dumps(value: object, **_kwargs: object) -> str:
    # One JSON line per delivery: orjson renders it several times faster than json.dumps.
    return orjson.dumps(value, default=repr).decode()


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]
