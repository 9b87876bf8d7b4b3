"""The small exception hierarchy every layer raises; messages say what to fix.

The HTTP layer maps these to status codes in one place (`api/errors.py`), the CLI to
exit codes in one place (`cli/__init__.py`).
"""

from __future__ import annotations


class BillhookError(Exception):
    """Base class: anything billhook refuses or cannot do, with a message a user can act on."""

    exit_code = 1


class ConfigError(BillhookError):
    """A setting is missing or invalid; the message names the variable."""

    exit_code = 2


class StoreUnavailable(BillhookError):
    """The database cannot be reached or cannot commit right now; retry later."""

    exit_code = 4


class NotFound(BillhookError):
    """The thing asked for (invoice, event, job, token) does not exist."""

    exit_code = 5


class InvalidRequest(BillhookError):
    """The request itself is wrong (bad filter, bad state for this action)."""

    exit_code = 2


class UnprocessableEvent(BillhookError):
    """A stored billing event lacks what processing needs; the message names the missing field."""

    exit_code = 2


class WebhookRejected(BillhookError):
    """An incoming delivery fails a check; `outcome` is the metrics label for it."""

    status_code = 400
    outcome = "rejected_malformed"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class SignatureError(WebhookRejected):
    outcome = "rejected_signature"


class TimestampError(WebhookRejected):
    outcome = "rejected_timestamp"


class MalformedPayload(WebhookRejected):
    outcome = "rejected_malformed"


class PayloadTooLarge(WebhookRejected):
    status_code = 413
    outcome = "rejected_too_large"


class Unauthorized(BillhookError):
    """No token, an unknown token or a revoked one."""

    exit_code = 6


class Forbidden(BillhookError):
    """A valid token whose role may not do this."""

    exit_code = 6
