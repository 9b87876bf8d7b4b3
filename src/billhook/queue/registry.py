"""Which code runs a job of each kind, and what happens when a job of that kind dies.

A handler is `handler(engine, job) -> None`: it opens its own transaction(s) on `engine`, and
raises to fail the attempt. It runs at least once per job (a crash after its commit and before
the completion reruns it), so it must be idempotent. A dead hook is `hook(connection, job)`,
called inside the transaction that marks the job dead, so the flag it sets (the invoice's
`attention`) commits atomically with the death.

The default registry imports `billhook.processing` when a worker starts, not when this module
is imported: the queue does not depend on billing at import time.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from sqlalchemy.engine import Engine

from billhook.errors import ConfigError
from billhook.queue.claims import DeadHook
from billhook.queue.jobs import PROCESS_EVENT, Job

Handler = Callable[[Engine, Job], None]


class UnknownJobKind(LookupError):
    """A job whose kind no handler is registered for: it fails (and in the end dies) visibly."""


@dataclass(frozen=True)
class Registry:
    handlers: Mapping[str, Handler]
    dead_hooks: Mapping[str, DeadHook] = field(default_factory=dict)

    def handler_for(self, kind: str) -> Handler:
        try:
            return self.handlers[kind]
        except KeyError:
            known = ", ".join(sorted(self.handlers)) or "none"
            raise UnknownJobKind(
                f"no handler registered for job kind {kind!r} (known: {known})"
            ) from None


def default_registry() -> Registry:
    """`process_event` -> `billhook.processing.handle_process_event`, its dead hook
    `billhook.processing.on_job_dead` when that exists."""
    processing = importlib.import_module("billhook.processing")
    hooks: dict[str, DeadHook] = {}
    on_dead = getattr(processing, "on_job_dead", None)
    if on_dead is not None:
        hooks[PROCESS_EVENT] = on_dead
    return Registry({PROCESS_EVENT: processing.handle_process_event}, hooks)


def load_registry(spec: str) -> Registry:
    """`module:attr` naming a `Registry`, or a callable returning one (tests, benchmarks)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"handlers {spec!r}: expected 'module:attribute'")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"handlers {spec!r}: cannot import it ({exc})") from exc
    registry = target() if callable(target) and not isinstance(target, Registry) else target
    if not isinstance(registry, Registry):
        raise ConfigError(f"handlers {spec!r}: is not a billhook.queue.registry.Registry")
    return registry
