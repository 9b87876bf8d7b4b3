"""First-start webhook secrets: generated once per source, kept beside the database, shown once.

Explicit configuration (`BILLHOOK_STRIPE_WEBHOOK_SECRETS`, `BILLHOOK_STANDARD_WEBHOOK_SECRETS`)
always wins; a generated secret only fills a source that has none, so `make run` works out of
the box and keeps working across restarts.
"""

from __future__ import annotations

import base64
import os
import secrets as _random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

from billhook.config import Settings
from billhook.errors import ConfigError

SECRETS_FILE = "webhook-secrets.json"


@dataclass(frozen=True)
class GeneratedSecret:
    source: str
    secret: str
    path: Path


def new_stripe_secret() -> str:
    return "whsec_" + _random.token_hex(24)


def new_standard_secret() -> str:
    return "whsec_" + base64.b64encode(_random.token_bytes(24)).decode()


_GENERATORS: dict[str, tuple[str, Callable[[], str]]] = {
    "stripe": ("stripe_webhook_secrets", new_stripe_secret),
    "standard": ("standard_webhook_secrets", new_standard_secret),
}


def ensure_secrets(settings: Settings) -> tuple[Settings, list[GeneratedSecret]]:
    """Settings with a secret for every source; the ones generated just now are returned too."""
    missing = [s for s, (field, _) in _GENERATORS.items() if not getattr(settings, field).strip()]
    if not missing:
        return settings, []
    path = settings.data_path / SECRETS_FILE
    stored = _read(path)
    created = []
    for source in missing:
        if not stored.get(source):
            stored[source] = _GENERATORS[source][1]()
            created.append(GeneratedSecret(source, stored[source], path))
    if created:
        _write(path, stored)
    updates = {_GENERATORS[source][0]: stored[source] for source in missing}
    return settings.model_copy(update=updates), created


def announcement(generated: list[GeneratedSecret]) -> str:
    """What to print once, when secrets were just generated."""
    lines = ["No webhook secret was configured, so billhook generated one per source:"]
    for item in generated:
        variable = _GENERATORS[item.source][0].upper()
        lines.append(f"  {item.source:<9} {item.secret}   (same as BILLHOOK_{variable})")
    lines += [
        f"They are kept in {generated[0].path} and reused on every start; this is the only time",
        "they are printed. Give the Stripe one to `stripe listen --forward-to` / your endpoint",
        "settings and the standard one to your Standard Webhooks sender, or set the variables",
        "above to use your own (explicit configuration wins). `billhook trigger` signs with them.",
    ]
    return "\n".join(lines)


def _read(path: Path) -> dict[str, str]:
    try:
        raw = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ConfigError(
            f"cannot read generated secrets at {path} ({exc}): fix or delete the file, "
            "or set BILLHOOK_STRIPE_WEBHOOK_SECRETS / BILLHOOK_STANDARD_WEBHOOK_SECRETS"
        ) from exc
    return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


def _write(path: Path, values: dict[str, str]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(orjson.dumps(values, option=orjson.OPT_INDENT_2))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        raise ConfigError(
            f"cannot keep generated secrets in {path} ({exc}): set BILLHOOK_DATA_DIR to a "
            "writable folder or configure the secrets explicitly"
        ) from exc
