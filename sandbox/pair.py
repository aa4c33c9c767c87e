"""Both sandboxes together, as `ordermill sandbox` runs them: state directory, logins, settings.

NEVER FOR PRODUCTION. The state directory keeps what must survive a restart for workers that
already point at the sandbox: the CA (sandbox/tls.py) and the logins (`logins.json`, random
on first start, readable by its owner only). Accounts and domains live in memory: a restarted
sandbox starts empty (a termination of an account it no longer knows succeeds, as on WHM).

Once both listen, `env` is written there (owner-only, it holds the logins): the settings that
point Ordermill at this sandbox, one `NAME=value` a line, for `set -a; . env; set +a`. It is
removed when the sandbox stops, so its presence means "listening" to a script waiting on it.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import string
from dataclasses import dataclass
from pathlib import Path

from sandbox.epp import SandboxEpp
from sandbox.failures import DeliberateFailures
from sandbox.tls import SandboxCA
from sandbox.whm import SandboxWhm

WHM_USER = "root"
WHM_TOKEN_ENV = "WHM_TOKEN_SANDBOX"  # the catalog's server names this variable
EPP_CLIENT_ID = "ordermill"
EPP_REGISTRANT_ID = "OM-SANDBOX-1"  # made at the sandbox registry, as a registrar sets one up
SERVER_NAME = "sandbox-web1"


class ListenError(Exception):
    """A sandbox could not listen (its port taken, most often): which one, where, why."""

    def __init__(self, what: str, host: str, port: int, exc: OSError) -> None:
        self.port = port
        self.in_use = exc.errno == errno.EADDRINUSE
        why = "the port is in use" if self.in_use else (exc.strerror or str(exc))
        super().__init__(f"the {what} sandbox cannot listen on {host}:{port}: {why}")


@dataclass(frozen=True)
class Logins:
    whm_token: str
    epp_password: str

    @classmethod
    def load_or_create(cls, state_dir: Path) -> Logins:
        path = state_dir / "logins.json"
        try:
            data = json.loads(path.read_text())
            return cls(whm_token=str(data["whm_token"]), epp_password=str(data["epp_password"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass
        # A WHM API token is 32 upper-case letters and digits.
        alphabet = string.ascii_uppercase + string.digits
        logins = cls(whm_token="".join(secrets.choice(alphabet) for _ in range(32)),
                     epp_password=secrets.token_urlsafe(18))
        _write_private(path, json.dumps({"whm_token": logins.whm_token,
                                         "epp_password": logins.epp_password}))
        return logins


class SandboxPair:
    def __init__(self, state_dir: Path, *, host: str = "127.0.0.1", whm_port: int = 0,
                 epp_port: int = 0, fail_rate: float = 0.0, fail_times: int = 1) -> None:
        self.state_dir = state_dir.resolve()
        self.host = host
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        self.ca, self.ca_file = SandboxCA.load_or_create(self.state_dir)
        self.logins = Logins.load_or_create(self.state_dir)
        # One counter each: an order's account and its domain share a name, and each fails.
        self.whm = SandboxWhm(username=WHM_USER, token=self.logins.whm_token, host=host,
                              port=whm_port, failures=DeliberateFailures(fail_rate, fail_times))
        hosts = [host, "127.0.0.1", "localhost"] if host in ("0.0.0.0", "::") else [host]
        self.epp = SandboxEpp(self.ca.server_context(hosts), client_id=EPP_CLIENT_ID,
                              password=self.logins.epp_password, host=host, port=epp_port,
                              failures=DeliberateFailures(fail_rate, fail_times))
        self.epp.add_contact(EPP_REGISTRANT_ID, EPP_CLIENT_ID)
        self.epp.foreign_unknown = True  # a transfer with any EPP code completes...
        self.epp.instant_transfer = True  # ...at once, as a gaining registrar would see it
        self.env_file = self.state_dir / "env"

    async def start(self) -> SandboxPair:
        self.env_file.unlink(missing_ok=True)
        try:
            await self.whm.start()
        except OSError as exc:
            raise ListenError("WHM", self.host, self.whm.port, exc) from None
        try:
            await self.epp.start()
        except BaseException as exc:
            await self.whm.stop()
            if isinstance(exc, OSError):
                raise ListenError("EPP", self.host, self.epp.port, exc) from None
            raise
        _write_private(self.env_file, "".join(f"{k}={v}\n" for k, v in self.settings().items()))
        return self

    async def stop(self) -> None:
        self.env_file.unlink(missing_ok=True)
        await self.epp.close()
        await self.whm.stop()

    async def __aenter__(self) -> SandboxPair:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def fix(self) -> None:
        """Deliberate failures stop (SIGUSR1)."""
        self.whm.failures.fix()
        self.epp.failures.fix()

    @property
    def client_host(self) -> str:
        """Where a worker on this machine reaches the sandbox."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    def whm_hostname(self) -> str:
        """The catalog server's `hostname` (host:port, as the cPanel module reads it)."""
        return f"{self.client_host}:{self.whm.port}"

    def settings(self) -> dict[str, str]:
        """Ordermill's settings (environment variables) that point it at this sandbox."""
        return {
            "WHM_SCHEME": "http",  # the sandbox WHM is plain HTTP, as WHM's own port 2086
            WHM_TOKEN_ENV: self.logins.whm_token,
            "EPP_HOST": self.client_host,
            "EPP_PORT": str(self.epp.port),
            "EPP_CLIENT_ID": EPP_CLIENT_ID,
            "EPP_PASSWORD": self.logins.epp_password,
            "EPP_REGISTRANT_ID": EPP_REGISTRANT_ID,
            "EPP_CAFILE": str(self.ca_file),
        }

    def catalog_server(self) -> str:
        """The catalog's [[servers]] entry for the sandbox WHM (the token stays in the env)."""
        return (f'[[servers]]\nname = "{SERVER_NAME}"\nmodule = "cpanel"\n'
                f'hostname = "{self.whm_hostname()}"\nusername = "{WHM_USER}"\n'
                f'token_env = "{WHM_TOKEN_ENV}"\n')


def _write_private(path: Path, text: str) -> None:
    """Owner-only, and whole or not at all (a script may be waiting for the file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
