"""Transfer EPP codes at rest: encrypted with EPP_CODE_KEY, or kept only until used.

A code is stored tagged with how it is kept:
- `fernet:<token>`: encrypted with the key in EPP_CODE_KEY (Fernet: AES-128-CBC and an
  HMAC-SHA256, from the `cryptography` package). Several comma-separated keys rotate: the
  first encrypts, any of them decrypts.
- `plain:<code>`: no key was set. The code is still blanked once its transfer went through,
  so it sits in the database only while it is needed.
A value without a tag is a code stored by an earlier release: plain.

Placement seals a code when it stores the order; the job runner unseals it only to hand it to
the registrar. Neither ever logs it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

log = logging.getLogger("ordermill.epp_codes")

ENV = "EPP_CODE_KEY"
SEALED = "fernet:"
PLAIN = "plain:"


class EppCodeError(ValueError):
    """A key that is not a Fernet key, or a stored code that cannot be decrypted."""


@dataclass(frozen=True)
class EppCodes:
    fernet: MultiFernet | None = field(default=None, repr=False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> EppCodes:
        """From EPP_CODE_KEY; a key that is set but not a Fernet key is refused at start."""
        raw = (os.environ if environ is None else environ).get(ENV, "")
        keys = [part.strip() for part in raw.split(",") if part.strip()]
        if not keys:
            return cls(None)
        try:
            return cls(MultiFernet([Fernet(key) for key in keys]))
        except (ValueError, TypeError):
            raise EppCodeError(
                f"{ENV} is not a Fernet key (32 url-safe base64-encoded bytes; make one with"
                " `python -c 'from cryptography.fernet import Fernet;"
                " print(Fernet.generate_key().decode())'`)") from None

    @property
    def encrypted(self) -> bool:
        return self.fernet is not None

    def seal(self, code: str | None) -> str | None:
        """The code as stored."""
        if code is None:
            return None
        if self.fernet is None:
            return PLAIN + code
        return SEALED + self.fernet.encrypt(code.encode()).decode()

    def unseal(self, stored: str | None) -> str | None:
        """The code as the registrar needs it."""
        if stored is None:
            return None
        if stored.startswith(PLAIN):
            return stored.removeprefix(PLAIN)
        if not stored.startswith(SEALED):
            return stored  # stored by an earlier release
        if self.fernet is None:
            raise EppCodeError(f"the EPP code is encrypted and {ENV} is not set")
        try:
            return self.fernet.decrypt(stored.removeprefix(SEALED).encode()).decode()
        except InvalidToken:
            raise EppCodeError(
                f"the EPP code cannot be decrypted with {ENV} (a key since removed?)") from None


def warn_if_plain(codes: EppCodes) -> None:
    if not codes.encrypted:
        log.warning(f"{ENV} is not set: transfer EPP codes are stored unencrypted until their"
                    " transfer went through")
