"""Typed reads from untrusted JSON; a wrong type is an `UnprocessableEvent` naming the field."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from billhook.errors import UnprocessableEvent


def obj(parent: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = parent.get(key)
    if not isinstance(value, Mapping):
        raise UnprocessableEvent(f"{where}: '{key}' must be a JSON object")
    return value


def opt_obj(parent: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any] | None:
    value = parent.get(key)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise UnprocessableEvent(f"{where}: '{key}' must be a JSON object when present")
    return value


def opt_str(parent: Mapping[str, Any], key: str, where: str) -> str | None:
    value = parent.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise UnprocessableEvent(f"{where}: '{key}' must be a string, got {value!r}")
    return value


def req_str(parent: Mapping[str, Any], key: str, where: str) -> str:
    value = opt_str(parent, key, where)
    if value is None:
        raise UnprocessableEvent(f"{where}: '{key}' is missing; processing needs it")
    return value


def opt_int(parent: Mapping[str, Any], key: str, where: str) -> int | None:
    value = parent.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UnprocessableEvent(
            f"{where}: '{key}' must be a non-negative integer (minor units), got {value!r}"
        )
    return value


def req_int(parent: Mapping[str, Any], key: str, where: str) -> int:
    value = opt_int(parent, key, where)
    if value is None:
        raise UnprocessableEvent(f"{where}: '{key}' is missing; processing needs it")
    return value


def opt_time(parent: Mapping[str, Any], key: str, where: str) -> float | None:
    value = parent.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UnprocessableEvent(f"{where}: '{key}' must be epoch seconds, got {value!r}")
    return float(value)


def id_of(parent: Mapping[str, Any], key: str, where: str) -> str | None:
    """An id field may be a string or, when expanded, an object with an `id`."""
    value = parent.get(key)
    if isinstance(value, Mapping):
        return opt_str(value, "id", f"{where}.{key}")
    return opt_str(parent, key, where)
