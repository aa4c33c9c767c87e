"""Operator accounts (table `operators`): argon2id hashes, roles, and the sign-in check with
its limit on failures per account and per address. Used by the console and `ordermill
operator`."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import asyncpg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

# argon2-cffi's defaults are argon2id with RFC 9106's low-memory profile (64 MiB, t=3).
_hasher = PasswordHasher()
# Verified against when the name is unknown, so a wrong name takes as long as a wrong password.
_DUMMY_HASH = _hasher.hash("not a password: the name is unknown")
NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,100}$")
MIN_PASSWORD = 10
MAX_PASSWORD = 1000  # argon2 hashes anything; a megabyte of "password" is a denial of service


class Role(StrEnum):
    REVIEWER = "reviewer"  # sees everything and acts
    VIEWER = "viewer"  # sees everything, acts on nothing


class AccountError(Exception):
    """A mistake about an account: one line for the CLI."""


@dataclass(frozen=True)
class Operator:
    id: int
    name: str
    role: Role
    password_changed_at: datetime

    @property
    def may_act(self) -> bool:
        return self.role == Role.REVIEWER


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise AccountError(f"operator name {name!r}: 1 to 100 letters, digits and _ . @ - only")
    return name


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"the password needs at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise AccountError(f"the password may have at most {MAX_PASSWORD} characters")
    return password


async def hash_password(password: str) -> str:
    # Hashing takes tens of milliseconds of CPU: off the event loop.
    return await asyncio.to_thread(_hasher.hash, password)


async def _verify(hashed: str, password: str) -> bool:
    def verify() -> bool:
        try:
            return _hasher.verify(hashed, password)
        except (VerificationError, InvalidHashError):
            return False
    return await asyncio.to_thread(verify)


def _operator(row: asyncpg.Record) -> Operator:
    return Operator(row["id"], row["name"], Role(row["role"]), row["password_changed_at"])


async def add(conn: asyncpg.Connection, name: str, role: Role, password: str) -> Operator:
    check_name(name)
    hashed = await hash_password(check_password(password))
    try:
        row = await conn.fetchrow(
            "INSERT INTO operators (name, role, password_hash) VALUES ($1, $2, $3) RETURNING *",
            name, role.value, hashed)
    except asyncpg.UniqueViolationError:
        raise AccountError(f"operator {name!r} exists already") from None
    return _operator(row)


async def listing(conn: asyncpg.Connection) -> list[dict[str, object]]:
    return [{"name": r["name"], "role": r["role"], "disabled": r["disabled"],
             "created_at": r["created_at"].isoformat()}
            for r in await conn.fetch("SELECT * FROM operators ORDER BY lower(name)")]


async def remove(conn: asyncpg.Connection, name: str) -> None:
    """Removed, not kept disabled: history names operators by name, so nothing refers to it."""
    if await conn.execute("DELETE FROM operators WHERE lower(name) = lower($1)", name) == "DELETE 0":
        raise AccountError(f"no operator {name!r}")


async def set_password(conn: asyncpg.Connection, name: str, password: str) -> None:
    """A new password; the sessions signed in with the old one end (password_changed_at)."""
    hashed = await hash_password(check_password(password))
    done = await conn.execute(
        "UPDATE operators SET password_hash = $2, password_changed_at = now()"
        " WHERE lower(name) = lower($1)", name, hashed)
    if done == "UPDATE 0":
        raise AccountError(f"no operator {name!r}")


async def by_id(conn: asyncpg.Connection, operator_id: int) -> Operator | None:
    row = await conn.fetchrow(
        "SELECT * FROM operators WHERE id = $1 AND NOT disabled", operator_id)
    return _operator(row) if row else None


@dataclass(frozen=True)
class SignInPolicy:
    max_failures: int
    window_minutes: float


class TooManyFailures(Exception):
    pass


async def sign_in(conn: asyncpg.Connection, name: str, password: str, address: str,
                  policy: SignInPolicy) -> Operator | None:
    """The operator, or None for a wrong name or password (the caller says the same for
    both); TooManyFailures when the account name or the address has failed too often in the
    window (checked first: no password is tried then). Writes only the failures table, in a
    read-write transaction of its own on the console's read-only pool."""
    key = name.strip().lower()[:200]
    window = float(policy.window_minutes * 60)
    async with conn.transaction():
        await conn.execute("SET TRANSACTION READ WRITE")
        failures = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM sign_in_failures WHERE name = $1"
            "  AND at > now() - make_interval(secs => $3)) AS by_name,"
            " (SELECT count(*) FROM sign_in_failures WHERE address = $2"
            "  AND at > now() - make_interval(secs => $3)) AS by_address", key, address, window)
        if max(failures["by_name"], failures["by_address"]) >= policy.max_failures:
            raise TooManyFailures
        row = await conn.fetchrow(
            "SELECT * FROM operators WHERE lower(name) = $1 AND NOT disabled", key)
        ok = await _verify(row["password_hash"] if row else _DUMMY_HASH, password[:MAX_PASSWORD])
        if row is None or not ok:
            await conn.execute("INSERT INTO sign_in_failures (name, address) VALUES ($1, $2)",
                               key, address)
            await conn.execute("DELETE FROM sign_in_failures WHERE at < now() - interval '1 day'")
            return None
        await conn.execute("DELETE FROM sign_in_failures WHERE name = $1", key)
        return _operator(row)
