"""The tests' WHM server: the package's sandbox (sandbox/whm.py), under the tests' name.

Everything the tests use (the failure-injection knobs, `calls`, `requests`, `accounts`) is
the sandbox's own; see its docstring.
"""

from sandbox.whm import SandboxWhm as FakeWhm
from sandbox.whm import WhmRequest, _Answer, absent_reason

__all__ = ["FakeWhm", "WhmRequest", "_Answer", "absent_reason"]
