"""The tests' EPP registry: the package's sandbox (sandbox/epp.py), under the tests' name.

Everything the tests use (fail_next, drop_next, stall_next, the flags, `calls`, `received`,
`domains`) is the sandbox's own; see its docstring.
"""

from sandbox.epp import MESSAGES, Received
from sandbox.epp import SandboxDomain as FakeDomain
from sandbox.epp import SandboxEpp as FakeEppServer

__all__ = ["MESSAGES", "FakeDomain", "FakeEppServer", "Received"]
