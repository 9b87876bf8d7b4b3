"""The `billhook` command line. Each module registers its commands on `app`."""

from billhook.cli import audit as _audit  # noqa: F401
from billhook.cli import dlq as _dlq  # noqa: F401
from billhook.cli import explain as _explain  # noqa: F401
from billhook.cli import migrate as _migrate  # noqa: F401
from billhook.cli import pause as _pause  # noqa: F401
from billhook.cli import replay as _replay  # noqa: F401
from billhook.cli import run as _run  # noqa: F401
from billhook.cli import serve as _serve  # noqa: F401
from billhook.cli import simulate as _simulate  # noqa: F401
from billhook.cli import status as _status  # noqa: F401
from billhook.cli import token as _token  # noqa: F401
from billhook.cli import trigger as _trigger  # noqa: F401
from billhook.cli import worker as _worker  # noqa: F401
from billhook.cli.app import app, main

__all__ = ["app", "main"]
