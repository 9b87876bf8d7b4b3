"""Settings from `BILLHOOK_*` environment variables, optionally a TOML file (`BILLHOOK_CONFIG`).

Environment variables win over the file; every setting has a safe default or fails at start-up
with a `ConfigError` naming the variable.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from billhook.errors import ConfigError

DEFAULT_DATABASE_URL = "sqlite:///./billhook.db"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BILLHOOK_", extra="ignore", frozen=True)

    database_url: str = DEFAULT_DATABASE_URL
    data_dir: str = ""
    stripe_webhook_secrets: str = ""
    standard_webhook_secrets: str = ""
    signature_tolerance_seconds: int = Field(300, ge=1)
    max_body_bytes: int = Field(1024 * 1024, ge=1)
    smtp_url: str = ""
    mail_from: str = "billing@billhook.localhost"
    effect_webhook_url: str = ""
    effect_webhook_secret: str = ""
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # HTTP server processes of `billhook serve` sharing the listening socket (1 = in-process).
    server_processes: int = Field(1, ge=1, le=64)
    workers: int = Field(2, ge=0)
    worker_concurrency: int = Field(4, ge=1)
    lease_seconds: float = Field(60.0, gt=0)
    retry_base_seconds: float = Field(1.0, gt=0)
    retry_max_seconds: float = Field(3600.0, gt=0)
    max_attempts: int = Field(10, ge=1)
    shutdown_grace_seconds: float = Field(30.0, ge=0)
    poll_interval_seconds: float = Field(0.2, gt=0)
    held_refund_alert_seconds: float = Field(86400.0, gt=0)
    log_format: str = "console"
    log_level: str = "info"
    templates_dir: str = ""

    @field_validator("log_format")
    @classmethod
    def _known_log_format(cls, value: str) -> str:
        if value not in ("json", "console"):
            raise ValueError("must be 'json' or 'console'")
        return value

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        if not value.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:", "postgres:")):
            raise ValueError("must start with sqlite:/// or postgresql://")
        return value

    @property
    def stripe_secrets(self) -> list[str]:
        return _split(self.stripe_webhook_secrets)

    @property
    def standard_secrets(self) -> list[str]:
        return _split(self.standard_webhook_secrets)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def data_path(self) -> Path:
        """Where billhook keeps its own files (generated secrets, maildir): beside the database."""
        if self.data_dir:
            return Path(self.data_dir)
        if self.is_sqlite:
            db_file = self.database_url.split("///", 1)[-1]
            if db_file and db_file != ":memory:":
                return Path(db_file).resolve().parent / ".billhook"
        return Path(".billhook").resolve()


def _split(raw: str) -> list[str]:
    return [part.strip() for part in raw.split(",") if part.strip()]


def load_settings(**overrides: Any) -> Settings:
    """Read the environment (and `BILLHOOK_CONFIG`, a TOML file) into `Settings`."""
    file_values: dict[str, Any] = {}
    config_file = os.environ.get("BILLHOOK_CONFIG")
    if config_file:
        try:
            with open(config_file, "rb") as handle:
                raw = tomllib.load(handle)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"BILLHOOK_CONFIG={config_file}: cannot read it ({exc})") from exc
        file_values = {key: value for key, value in raw.get("billhook", raw).items()}
        env_names = {
            key[len("BILLHOOK_") :].lower() for key in os.environ if key.startswith("BILLHOOK_")
        }
        file_values = {k: v for k, v in file_values.items() if k not in env_names}
    try:
        return Settings(**{**file_values, **overrides})
    except ValidationError as exc:
        problems = "; ".join(
            f"BILLHOOK_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from exc
