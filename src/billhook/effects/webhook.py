"""POST an effect to the user's own service: Standard Webhooks signature, Idempotency-Key."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
from standardwebhooks import Webhook

from billhook.config import Settings
from billhook.errors import ConfigError

WEBHOOK_TIMEOUT_SECONDS = 10.0


class DownstreamError(Exception):
    """The downstream service answered with a non-2xx status; retried with backoff."""


class WebhookSender:
    def __init__(self, url: str, secret: str, *, timeout: float = WEBHOOK_TIMEOUT_SECONDS) -> None:
        if not secret:
            raise ConfigError(
                "BILLHOOK_EFFECT_WEBHOOK_SECRET must be set (a whsec_... secret) when "
                "BILLHOOK_EFFECT_WEBHOOK_URL is set, so the receiver can verify what billhook sends"
            )
        try:
            self._signer = Webhook(secret)
        except Exception as exc:
            raise ConfigError(
                f"BILLHOOK_EFFECT_WEBHOOK_SECRET is not a valid Standard Webhooks secret "
                f"(whsec_ followed by base64): {exc}"
            ) from exc
        self._url = url
        self._client = httpx.Client(timeout=timeout)

    def send(
        self, *, kind: str, idempotency_key: str, payload: Mapping[str, Any], now: float
    ) -> None:
        body = orjson.dumps(
            {"kind": kind, "idempotency_key": idempotency_key, "payload": dict(payload)}
        ).decode()
        timestamp = datetime.fromtimestamp(int(now), tz=UTC)
        headers = {
            "content-type": "application/json",
            "idempotency-key": idempotency_key,
            "webhook-id": idempotency_key,
            "webhook-timestamp": str(int(now)),
            "webhook-signature": self._signer.sign(idempotency_key, timestamp, body),
        }
        response = self._client.post(self._url, content=body.encode(), headers=headers)
        if not 200 <= response.status_code < 300:
            raise DownstreamError(
                f"{self._url} answered {response.status_code}: {response.text[:200]!r}"
            )

    def close(self) -> None:
        self._client.close()


def webhook_sender_from_settings(settings: Settings) -> WebhookSender | None:
    if not settings.effect_webhook_url:
        return None
    return WebhookSender(settings.effect_webhook_url, settings.effect_webhook_secret)
