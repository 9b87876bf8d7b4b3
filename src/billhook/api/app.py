"""`create_app`: the Starlette application, its routes and its shared state.

`app.state` holds `settings` (secrets filled in), `engine`, `writer` (the `EventWriter`) and
`on_enqueued`: an optional `Callable[[], None]` called after every commit that enqueued a job,
so in-process workers can wake at once instead of at their next poll.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

from sqlalchemy.engine import Engine
from starlette.applications import Starlette
from starlette.routing import BaseRoute, Mount
from starlette.types import Receive, Scope, Send

from billhook.api import health, metrics, webhooks
from billhook.api.admin import PREFIX as ADMIN_PREFIX
from billhook.api.admin import create_admin_app
from billhook.api.errors import EXCEPTION_HANDLERS
from billhook.config import Settings
from billhook.ingest import EventWriter
from billhook.secrets import announcement, ensure_secrets
from billhook.sources.standard import decode_secret
from billhook.store.engine import create_engine


def assemble_routes(settings: Settings, engine: Engine) -> list[BaseRoute]:
    """Every route of the app, in one place.

    The webhook hot path stays on plain Starlette routes. Other surfaces mount here, e.g. the
    admin API: `Mount("/api/v1", app=create_admin_app(settings, engine))`.
    """
    return [
        *webhooks.routes(),
        *health.routes(),
        *metrics.routes(engine),
        Mount(ADMIN_PREFIX, app=create_admin_app(settings, engine)),
    ]


def create_app(
    settings: Settings,
    engine: Engine | None = None,
    *,
    extra_routes: Sequence[BaseRoute] = (),
    on_enqueued: Callable[[], None] | None = None,
) -> Starlette:
    """The HTTP app. Starts even when the database is down: it answers 503 until it is back."""
    settings = with_secrets(settings)
    owns_engine = engine is None
    store = engine if engine is not None else create_engine(settings.database_url)
    writer = EventWriter(store, max_attempts=settings.max_attempts)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            writer.close()
            if owns_engine:
                store.dispose()

    app = _App(
        routes=[*assemble_routes(settings, store), *extra_routes],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = store
    app.state.writer = writer
    app.state.on_enqueued = on_enqueued
    app.webhook_handlers = webhooks.handlers(app.state)
    return app


class _App(Starlette):
    """Starlette, with `POST /webhooks/*` answered by raw ASGI handlers before its middleware and
    router: on the hot path those cost more per delivery than verifying and parsing it."""

    webhook_handlers: dict[str, webhooks.Handler] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            handler = self.webhook_handlers.get(scope["path"])
            if handler is not None:
                await handler(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def with_secrets(settings: Settings) -> Settings:
    """Settings with a secret for every source (generated and announced once if none is set)."""
    settings, generated = ensure_secrets(settings)
    if generated:
        print(announcement(generated), file=sys.stderr, flush=True)
    for secret in settings.standard_secrets:
        decode_secret(secret)  # a malformed secret is a start-up error, not a stream of 400s
    return settings
