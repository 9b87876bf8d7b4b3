"""The `billhook` command line. Each module registers its commands on `app`."""

from billhook.cli import migrate as _migrate  # noqa: F401
from billhook.cli.app import app, main

__all__ = ["app", "main"]
