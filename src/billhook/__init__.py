"""billhook: billing webhooks received durably, processed once, explained always."""

__version__ = "0.1.0"
