"""Signing secrets at rest: encrypted with WEBHOOK_SECRET_KEY (Fernet), as EPP codes are with
EPP_CODE_KEY (shared/epp_codes.py). A secret must be read back to sign, so it is encrypted,
not hashed. Stored tagged: `fernet:<token>`, or `plain:<secret>` when no key is set (a
warning at start says so). Never logged; shown once, when created or rotated."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from pydantic import SecretStr

from shared.errors import ConfigurationError

log = logging.getLogger("ordermill.webhooks")

SETTING = "WEBHOOK_SECRET_KEY"
SEALED, PLAIN = "fernet:", "plain:"


class SealError(ConfigurationError, ValueError):
    """A key that is not a Fernet key (`ordermill run` says so in one line and stops), or a
    stored secret that cannot be decrypted."""


@dataclass(frozen=True)
class Sealer:
    fernet: MultiFernet | None = field(default=None, repr=False)

    @classmethod
    def from_key(cls, key: SecretStr | None) -> Sealer:
        raw = key.get_secret_value() if key is not None else ""
        keys = [part.strip() for part in raw.split(",") if part.strip()]
        if not keys:
            return cls(None)
        try:
            return cls(MultiFernet([Fernet(k) for k in keys]))
        except (ValueError, TypeError):
            raise SealError(f"{SETTING} is not a Fernet key (32 url-safe base64-encoded bytes:"
                            " `python -c 'from cryptography.fernet import Fernet;"
                            " print(Fernet.generate_key().decode())'`)") from None

    @property
    def encrypted(self) -> bool:
        return self.fernet is not None

    def seal(self, secret: str) -> str:
        if self.fernet is None:
            return PLAIN + secret
        return SEALED + self.fernet.encrypt(secret.encode()).decode()

    def unseal(self, stored: str) -> str:
        if stored.startswith(PLAIN):
            return stored.removeprefix(PLAIN)
        if self.fernet is None:
            raise SealError(f"the endpoint's secret is encrypted and {SETTING} is not set")
        try:
            return self.fernet.decrypt(stored.removeprefix(SEALED).encode()).decode()
        except InvalidToken:
            raise SealError(f"the endpoint's secret cannot be decrypted with {SETTING}"
                            " (a key since removed?)") from None

    def warn_if_plain(self) -> None:
        if not self.encrypted:
            log.warning(f"{SETTING} is not set: webhook signing secrets are stored unencrypted")
