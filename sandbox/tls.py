"""The sandbox's own certificate authority, kept in its state directory.

The EPP sandbox speaks TLS, as registries do (RFC 5734). Its server certificate is signed by
a CA made for this sandbox alone, on first start, and kept (`ca.pem`, and `ca-key.pem`
readable by its owner only) so that workers already trusting it (EPP_CAFILE) keep working
when the sandbox restarts. Nothing else should trust this CA: it is the sandbox's, and its
key sits on disk unencrypted. Made with `cryptography` (a runtime dependency already), so the
sandbox needs no test-only package.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_NAME = "Ordermill sandbox CA (never for production)"


class SandboxCA:
    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key

    @classmethod
    def load_or_create(cls, state_dir: Path) -> tuple[SandboxCA, Path]:
        """The CA kept in `state_dir` (made there the first time) and its certificate's path."""
        state_dir.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = state_dir / "ca.pem", state_dir / "ca-key.pem"
        if cert_path.exists() and key_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if (isinstance(key, ec.EllipticCurvePrivateKey)
                    and cert.not_valid_after_utc > datetime.now(UTC) + timedelta(days=1)):
                return cls(cert, key), cert_path
        ca = cls.create()
        _write(key_path, ca.key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()), mode=0o600)
        _write(cert_path, ca.cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        return ca, cert_path

    @classmethod
    def create(cls) -> SandboxCA:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
        now = datetime.now(UTC)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(minutes=5))
                .not_valid_after(now + timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(ski, critical=False)
                .sign(key, hashes.SHA256()))
        return cls(cert, key)

    def server_context(self, hosts: list[str]) -> ssl.SSLContext:
        """A server TLS context with a fresh certificate for `hosts` (names or addresses)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        names: list[x509.GeneralName] = []
        for host in dict.fromkeys(hosts):
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(minutes=5))
                .not_valid_after(now + timedelta(days=365))
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.key.public_key()), critical=False)
                .sign(self.key, hashes.SHA256()))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        # ssl loads a chain from files only: a private temporary file, removed at once.
        with tempfile.TemporaryDirectory(prefix="ordermill-sandbox-") as tmp:
            pem = Path(tmp) / "server.pem"
            _write(pem, key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())
                   + cert.public_bytes(serialization.Encoding.PEM), mode=0o600)
            context.load_cert_chain(pem)
        return context


def _write(path: Path, data: bytes, *, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
