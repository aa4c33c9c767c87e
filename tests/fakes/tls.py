"""The test certificate authority, trusted the way a deployment trusts one: SSL_CERT_FILE.

Imported by conftest before anything imports aiohttp, which reads the default trust store
once, at import. The minFraud package always speaks https; with this CA trusted, the fake
minFraud server on 127.0.0.1 is reached without patching the package.
"""

from __future__ import annotations

import atexit
import os
import shutil
import ssl
import tempfile
from pathlib import Path

import trustme

TEST_CA = trustme.CA()
_dir = Path(tempfile.mkdtemp(prefix="ordermill-test-ca-"))
atexit.register(shutil.rmtree, _dir, ignore_errors=True)
CA_FILE = _dir / "ca.pem"
TEST_CA.cert_pem.write_to_path(str(CA_FILE))
os.environ["SSL_CERT_FILE"] = str(CA_FILE)


def server_context() -> ssl.SSLContext:
    """A server certificate for 127.0.0.1 and localhost, signed by the test CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    TEST_CA.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context
