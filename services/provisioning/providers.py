"""Server modules and registrars by name, built once per server and reused (one HTTP
session each). Secrets come from the environment, never from the catalog."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import asyncpg

from services.provisioning.modules.base import Account, ModuleResult, ServerModule
from services.provisioning.registrars.base import DomainRequest, Registrar, RegistrarResult
from shared.epp_codes import EppCodes
from shared.settings_parts import ProvidersSettings

log = logging.getLogger("ordermill.provisioning")

# Secrets read from the environment by name (servers' tokens are named by their token_env).
SECRET_ENVIRONMENT = ("EPP_PASSWORD",)


class Misconfigured:
    """Stands in for a module or registrar that cannot be built: every call fails
    definitively with the reason, so the job is parked where an operator sees why."""

    calls_server = True  # what it stands in for may

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason

    async def create(self, account: Account) -> ModuleResult:
        return ModuleResult.failure(self.reason)

    async def suspend(self, account: Account, reason: str) -> ModuleResult:
        return ModuleResult.failure(self.reason)

    async def unsuspend(self, account: Account) -> ModuleResult:
        return ModuleResult.failure(self.reason)

    async def terminate(self, account: Account) -> ModuleResult:
        return ModuleResult.failure(self.reason)

    async def register(self, request: DomainRequest) -> RegistrarResult:
        return RegistrarResult.failure(self.reason)

    async def transfer(self, request: DomainRequest) -> RegistrarResult:
        return RegistrarResult.failure(self.reason)

    async def close(self) -> None:
        return None


class Providers:
    def __init__(self, settings: ProvidersSettings,
                 environ: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.environ = os.environ if environ is None else environ
        # Transfer EPP codes are stored sealed (shared.epp_codes); a bad key stops the worker.
        self.epp_codes = EppCodes.from_environ(self.environ)
        self._modules: dict[tuple[str, int | None], Any] = {}
        self._registrars: dict[str, Any] = {}

    def module(self, name: str, server: asyncpg.Record | None) -> ServerModule:
        key = (name, server["id"] if server else None)
        if key not in self._modules:
            self._modules[key] = self._build_module(name, server)
        return self._modules[key]

    def calls_server(self, module: str) -> bool:
        """Whether the module of that name calls a server (its class's `calls_server`; an
        unknown module is taken to call one), without building it."""
        return getattr(_module_class(module), "calls_server", True)

    def registrar(self, name: str) -> Registrar:
        if name not in self._registrars:
            self._registrars[name] = self._build_registrar(name)
        return self._registrars[name]

    async def close(self) -> None:
        for provider in [*self._modules.values(), *self._registrars.values()]:
            await provider.close()
        self._modules.clear()
        self._registrars.clear()

    def _build_module(self, name: str, server: asyncpg.Record | None) -> Any:
        if name == "autorelease":
            return _module_class(name)()
        if name == "cpanel":
            if server is None:
                return Misconfigured(name, "product uses cpanel but names no server")
            token = self.environ.get(server["token_env"] or "")
            if not token:
                return Misconfigured(name, f"server {server['name']}: environment variable "
                                           f"{server['token_env'] or '(token_env unset)'} is not set")
            host, _, port = (server["hostname"] or "").partition(":")
            return _module_class(name).for_server(self.settings.whm, hostname=host,
                                           port=int(port or 2087),
                                           username=server["username"], token=token)
        return Misconfigured(name, f"unknown server module {name!r}")

    def _build_registrar(self, name: str) -> Any:
        if name == "manual":
            from services.provisioning.registrars.manual import ManualRegistrar

            return ManualRegistrar()
        if name == "epp":
            epp = self.settings.epp
            password = self.environ.get("EPP_PASSWORD")
            if not (epp.host and epp.client_id and epp.registrant_id and password):
                return Misconfigured(name, "EPP registrar needs EPP_HOST, EPP_CLIENT_ID, "
                                           "EPP_REGISTRANT_ID and EPP_PASSWORD")
            from services.provisioning.registrars.epp import EppRegistrar

            return EppRegistrar.from_settings(epp, password)
        return Misconfigured(name, f"unknown registrar {name!r}")


def _module_class(name: str) -> Any:
    """The server module's class by its catalog name (imported when first needed), or None."""
    if name == "autorelease":
        from services.provisioning.modules.autorelease import AutoreleaseModule

        return AutoreleaseModule
    if name == "cpanel":
        from services.provisioning.modules.cpanel import CpanelModule

        return CpanelModule
    return None
