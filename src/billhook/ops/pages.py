"""Keyset pagination shared by the list use cases: a limit check and an opaque cursor.

A cursor is the sort key of the last row a page returned, JSON in URL-safe base64. It is opaque
to clients (they pass back `next_cursor`), and keyset paging stays correct while rows are added,
unlike an offset.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import orjson

from billhook.errors import InvalidRequest

T = TypeVar("T")

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_ID = 2**62


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequest(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    return limit


def encode_cursor(key: list[Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(key)).decode().rstrip("=")


def decode_cursor(cursor: str, kinds: tuple[type, ...]) -> list[Any]:
    """The sort key inside `cursor`, checked against the expected types of its parts."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        key = orjson.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise _bad_cursor() from exc
    if not isinstance(key, list) or len(key) != len(kinds):
        raise _bad_cursor()
    checked: list[Any] = []
    for part, kind in zip(key, kinds, strict=True):
        if kind is float and isinstance(part, int) and not isinstance(part, bool):
            part = float(part)
        if not isinstance(part, kind) or isinstance(part, bool):
            raise _bad_cursor()
        if isinstance(part, int) and not -MAX_ID <= part <= MAX_ID:  # beyond BIGINT
            raise _bad_cursor()
        checked.append(part)
    return checked


def _bad_cursor() -> InvalidRequest:
    return InvalidRequest("cursor is not one this API returned; pass next_cursor back unchanged")
