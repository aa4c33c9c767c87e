"""The server module interface: create, suspend, unsuspend, terminate a hosting account.

Every call returns a ModuleResult and never raises for a failure of the remote side:
`transient` failures (connection refused, timeout, HTTP 5xx) are retried later with
backoff by the job runner; the others are definitive and park the job for an operator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Account:
    service_id: int
    username: str  # deterministic per service, saved before the first call
    domain: str
    plan: str  # the product's package name on the server
    contact_email: str
    password: str | None = None  # a secret: never logged


@dataclass(frozen=True)
class ModuleResult:
    ok: bool
    error: str | None = None
    transient: bool = False
    # What the server said, for the record (no secrets): e.g. {"adopted": true, "ip": "..."}
    detail: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def success(cls, **detail: Any) -> ModuleResult:
        return cls(True, detail=detail)

    @classmethod
    def failure(cls, error: str, *, transient: bool = False, **detail: Any) -> ModuleResult:
        return cls(False, error=error, transient=transient, detail=detail)


class ServerModule(Protocol):
    name: str
    # Whether its operations call a server: a lane of a module that calls none (and names
    # no server) is bounded by JOB_CONCURRENCY alone, having no server to protect.
    calls_server: bool

    async def create(self, account: Account) -> ModuleResult: ...

    async def suspend(self, account: Account, reason: str) -> ModuleResult: ...

    async def unsuspend(self, account: Account) -> ModuleResult: ...

    async def terminate(self, account: Account) -> ModuleResult: ...

    async def close(self) -> None: ...
