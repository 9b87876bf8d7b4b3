"""Admin API tokens: mint (shown once, stored hashed), list, revoke, and authenticate a bearer.

A token is `bh_` + 32 random bytes (URL-safe base64). Only its SHA-256 is stored. A plain,
unsalted, fast hash is the right tool here, unlike for passwords: the input has 256 bits of
entropy, so there is no dictionary to try and no point in slowing down a guess; a salt would
also make the lookup by hash impossible. Whoever reads the table cannot use what they read.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from billhook.errors import Forbidden, InvalidRequest, NotFound, Unauthorized
from billhook.ops.audit import CLI_ACTOR_PREFIX, perform
from billhook.store.engine import transaction
from billhook.store.schema import api_tokens

Role = Literal["viewer", "operator"]
ROLES: tuple[Role, ...] = get_args(Role)
TOKEN_PREFIX = "bh_"
MAX_NAME_LENGTH = 128

# What each role may do; an operator can do everything a viewer can.
_RANK: dict[str, int] = {"viewer": 1, "operator": 2}


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's name (the audit actor) and its role."""

    name: str
    role: Role

    def require(self, role: Role) -> None:
        if _RANK[self.role] < _RANK[role]:
            raise Forbidden(
                f"token {self.name!r} has role {self.role!r}; this needs role {role!r} "
                f"(mint one with: billhook token create --role {role} --name NAME)"
            )


@dataclass(frozen=True)
class TokenInfo:
    name: str
    role: Role
    created_at: float
    revoked_at: float | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(
    engine: Engine,
    *,
    name: str,
    role: str,
    actor: str,
    now: Callable[[], float] = time.time,
) -> str:
    """Mint a token, store its hash, audit it; return the token (the only time it exists)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)

    def _insert() -> None:
        checked_role = _check_role(role)
        _check_name(name)
        taken = InvalidRequest(
            f"a token named {name!r} already exists (names stay taken after revoke); "
            "pick another name"
        )
        try:
            with transaction(engine) as connection:
                exists = connection.execute(
                    sa.select(api_tokens.c.id).where(api_tokens.c.name == name)
                ).first()
                if exists is not None:
                    raise taken
                connection.execute(
                    api_tokens.insert().values(
                        name=name,
                        role=checked_role,
                        token_hash=hash_token(token),
                        created_at=now(),
                    )
                )
        except sa.exc.IntegrityError as exc:  # a concurrent create of the same name won
            raise taken from exc

    perform(
        engine,
        actor=actor,
        action="token.create",
        params={"name": name, "role": role},
        operation=_insert,
        now=now,
    )
    return token


def revoke_token(
    engine: Engine, *, name: str, actor: str, now: Callable[[], float] = time.time
) -> TokenInfo:
    """Revoke by name (revoking a revoked token changes nothing); audited."""

    def _revoke() -> TokenInfo:
        with transaction(engine) as connection:
            connection.execute(
                api_tokens.update()
                .where(api_tokens.c.name == name, api_tokens.c.revoked_at.is_(None))
                .values(revoked_at=now())
            )
            row = (
                connection.execute(sa.select(api_tokens).where(api_tokens.c.name == name))
                .mappings()
                .first()
            )
        if row is None:
            raise NotFound(f"no token named {name!r}; see the names with: billhook token list")
        return _info(row)

    return perform(
        engine,
        actor=actor,
        action="token.revoke",
        params={"name": name},
        operation=_revoke,
        now=now,
    )


def list_tokens(engine: Engine) -> list[TokenInfo]:
    """Every token, oldest first, without its hash."""
    with engine.connect() as connection:
        rows = (
            connection.execute(
                sa.select(
                    api_tokens.c.name,
                    api_tokens.c.role,
                    api_tokens.c.created_at,
                    api_tokens.c.revoked_at,
                ).order_by(api_tokens.c.id)
            )
            .mappings()
            .all()
        )
    return [_info(row) for row in rows]


def authenticate(engine: Engine, token: str | None) -> Principal:
    """The principal a bearer token stands for; `Unauthorized` for none, unknown or revoked."""
    if not token:
        raise Unauthorized(
            "this route needs an admin token: send 'Authorization: Bearer <token>' "
            "(mint one with: billhook token create --role viewer --name NAME)"
        )
    presented = hash_token(token)
    with engine.connect() as connection:
        row = (
            connection.execute(
                sa.select(
                    api_tokens.c.name,
                    api_tokens.c.role,
                    api_tokens.c.token_hash,
                    api_tokens.c.revoked_at,
                ).where(api_tokens.c.token_hash == presented)
            )
            .mappings()
            .first()
        )
    # The index lookup compares hashes, not the secret: timing there tells an attacker how much
    # of a SHA-256 they matched, which does not help to find a preimage. The final comparison is
    # constant-time anyway, so equality is never decided by an early-exit string compare.
    if row is None or not hmac.compare_digest(str(row["token_hash"]), presented):
        raise Unauthorized(
            "this token is not known; check that it was copied whole, "
            "or mint a new one with: billhook token create"
        )
    if row["revoked_at"] is not None:
        raise Unauthorized(
            f"token {row['name']!r} was revoked; ask an operator for a new one "
            "(billhook token create)"
        )
    return Principal(name=row["name"], role=_check_role(row["role"]))


def _check_role(role: str) -> Role:
    for known in ROLES:
        if role == known:
            return known
    raise InvalidRequest(f"role must be one of {', '.join(ROLES)}, got {role!r}")


def _check_name(name: str) -> None:
    if not name or len(name) > MAX_NAME_LENGTH or not name.isprintable() or name != name.strip():
        raise InvalidRequest(
            f"token name must be 1 to {MAX_NAME_LENGTH} printable characters "
            f"without surrounding spaces, got {name!r}"
        )
    # The name is the audit actor; `cli:` is how command-line actions are recorded.
    if name.startswith(CLI_ACTOR_PREFIX):
        raise InvalidRequest(f"token names may not start with {CLI_ACTOR_PREFIX!r}: {name!r}")


def _info(row: sa.RowMapping) -> TokenInfo:
    return TokenInfo(
        name=row["name"],
        role=_check_role(row["role"]),
        created_at=float(row["created_at"]),
        revoked_at=None if row["revoked_at"] is None else float(row["revoked_at"]),
    )
