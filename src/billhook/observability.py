"""Structured logs (structlog) and the Prometheus registry every component records into."""

from __future__ import annotations

import logging
import sys

import orjson
import structlog

from billhook.config import Settings


def configure_logging(config: Settings) -> None:
    level = getattr(logging, config.log_level.upper(), logging.INFO)
    renderer: structlog.types.Processor
    factory: structlog.types.WrappedLogger
    binary = getattr(sys.stderr, "buffer", None)
    if config.log_format == "json" and binary is not None:
        # One JSON line per delivery: orjson renders it several times faster than json.dumps,
        # and as bytes, written as they are (no decode, no print()).
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        factory = structlog.BytesLoggerFactory(file=binary)
    elif config.log_format == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_text)
        factory = structlog.PrintLoggerFactory(file=sys.stderr)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        factory = structlog.PrintLoggerFactory(file=sys.stderr)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )


def _orjson_dumps(value: object, **_kwargs: object) -> bytes:
    return orjson.dumps(value, default=repr)


def _orjson_text(value: object, **_kwargs: object) -> str:
    return orjson.dumps(value, default=repr).decode()


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]
