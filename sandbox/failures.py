"""Deliberate failures, for demonstrating the module queue: chosen by name, then cured by a retry.

A name (a hosting account's domain, a domain being registered) is chosen when it contains
the marker (`sandbox-fail`, for tests and for an operator who wants one on purpose) or when
a hash of it falls under `rate` (deterministic: the same name is chosen on every run, and
no randomness decides which of a demo's orders fail). A chosen name's first `times`
creates fail definitively (the job parks at once, as on a refusal a real server gives);
after that it succeeds, so the operator's retry from the module queue completes it.

`times=0` keeps chosen names failing until the sandbox is "fixed" (`fix()`, which
`ordermill sandbox` calls on SIGUSR1), for showing a server that is broken until someone
repairs it.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter

from sandbox import BANNER

log = logging.getLogger("ordermill.sandbox")

MARKER = "sandbox-fail"


class DeliberateFailures:
    def __init__(self, rate: float = 0.0, times: int = 1, *, marker: str = MARKER) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"fail rate must be between 0 and 1, not {rate}")
        if times < 0:
            raise ValueError(f"fail times must be 0 (until fixed) or more, not {times}")
        self.rate = rate
        self.times = times
        self.marker = marker
        self.fixed = False
        self.failed: Counter[str] = Counter()  # name -> deliberate failures so far

    def chosen(self, name: str) -> bool:
        name = name.strip().lower()
        if self.marker and self.marker in name:
            return True
        digest = hashlib.sha256(name.encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.rate

    def should_fail(self, name: str) -> bool:
        """Whether this create of `name` fails on purpose (counted when it does)."""
        if self.fixed or not self.chosen(name):
            return False
        if self.times and self.failed[name] >= self.times:
            return False
        self.failed[name] += 1
        log.warning("%s: failing %s on purpose (deliberate failure %d)", BANNER, name,
                    self.failed[name])
        return True

    def fix(self) -> None:
        """Every chosen name succeeds from now on (the server was repaired)."""
        self.fixed = True
        log.warning("%s: fixed, deliberate failures stop", BANNER)

    def reason(self, name: str) -> str:
        """What the server answers: says it is on purpose, and what cures it."""
        cure = ("retry it once the sandbox is fixed (SIGUSR1 to `ordermill sandbox`)"
                if self.times == 0 else "retry it: a later attempt succeeds")
        return f"Ordermill sandbox: {name} failed on purpose, to show the module queue; {cure}"
