"""The manual registrar (WHMCS's "email notification" registrar): no call to any registry.

Registrations and transfers succeed at once as Pending Registration / Pending Transfer with
detail {"manual": True}; an operator completes them by hand at the registrar and sets the domain
Active. Telling the operator (an email, the failures list) is the job runner's business.
"""

from __future__ import annotations

import logging

from services.provisioning.registrars.base import DomainRequest, RegistrarResult
from shared.states import DomainStatus

log = logging.getLogger("ordermill.registrar.manual")


class ManualRegistrar:
    name = "manual"

    async def register(self, request: DomainRequest) -> RegistrarResult:
        log.info("domain awaits manual registration",
                 extra={"domain_id": request.domain_id, "domain": request.domain})
        return RegistrarResult.success(DomainStatus.PENDING_REGISTRATION, manual=True)

    async def transfer(self, request: DomainRequest) -> RegistrarResult:
        # The EPP code is a secret: the operator reads it from the order, it is never logged.
        log.info("domain awaits manual transfer",
                 extra={"domain_id": request.domain_id, "domain": request.domain})
        return RegistrarResult.success(DomainStatus.PENDING_TRANSFER, manual=True)

    async def close(self) -> None:
        return None
