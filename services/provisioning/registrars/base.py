"""The registrar interface: register or transfer a domain.

Like server modules, calls return a RegistrarResult and never raise for a remote failure:
`transient` failures are retried later with backoff; the others park the job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from shared.states import DomainStatus

# What a registrar's success leaves the domain as.
DomainOutcome = Literal[
    DomainStatus.ACTIVE, DomainStatus.PENDING_REGISTRATION, DomainStatus.PENDING_TRANSFER]


@dataclass(frozen=True)
class Registrant:
    first_name: str
    last_name: str
    email: str
    country: str | None
    company: str | None = None


@dataclass(frozen=True)
class DomainRequest:
    domain_id: int
    domain: str
    years: int
    registrant: Registrant
    epp_code: str | None = field(default=None, repr=False)  # transfers: a secret, never logged


@dataclass(frozen=True)
class RegistrarResult:
    ok: bool
    status: DomainOutcome | None = None  # on success: the domain's new status
    error: str | None = None
    transient: bool = False
    detail: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def success(cls, status: DomainOutcome, **detail: Any) -> RegistrarResult:
        return cls(True, status=status, detail=detail)

    @classmethod
    def failure(cls, error: str, *, transient: bool = False, **detail: Any) -> RegistrarResult:
        return cls(False, error=error, transient=transient, detail=detail)


class Registrar(Protocol):
    name: str

    async def register(self, request: DomainRequest) -> RegistrarResult: ...

    async def transfer(self, request: DomainRequest) -> RegistrarResult: ...

    async def close(self) -> None: ...
