"""The "autorelease" module (as in WHMCS): no server, no external call, every operation succeeds.

For products that need no account on a server (a licence sent by hand, a service set up by
staff): the item simply becomes Active, Suspended or Terminated.
"""

from __future__ import annotations

from services.provisioning.modules.base import Account, ModuleResult


class AutoreleaseModule:
    name = "autorelease"
    # No server to protect from a burst of calls: its lane is bounded by JOB_CONCURRENCY
    # alone, not JOB_LANE_CONCURRENCY (services/provisioning/jobs.py).
    calls_server = False

    async def create(self, account: Account) -> ModuleResult:
        return ModuleResult.success()

    async def suspend(self, account: Account, reason: str) -> ModuleResult:
        return ModuleResult.success()

    async def unsuspend(self, account: Account) -> ModuleResult:
        return ModuleResult.success()

    async def terminate(self, account: Account) -> ModuleResult:
        return ModuleResult.success()

    async def close(self) -> None:
        return None
