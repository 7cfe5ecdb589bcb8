"""A certificate authority made on the fly (trustme) and the PEM files a TLS broker and its
clients are given; plus what certificate a TLS port presents right now.

``pki = TestPKI.create(tmp_path)`` makes a CA; ``pki.server("127.0.0.1")`` issues a server
certificate into ``cert.pem``/``key.pem`` files (``not_after=`` for an expired one);
``pki.client()`` a client certificate. Files are replaced atomically (``os.replace``), the
way a renewal should write them.
"""

from __future__ import annotations

import datetime
import os
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import trustme
from cryptography import x509

__all__ = ["TestPKI", "presented_serial"]


def _write(path: Path, data: bytes) -> None:
    temp = path.with_name(path.name + ".new")
    temp.write_bytes(data)
    os.replace(temp, path)


@dataclass
class TestPKI:
    """One test CA and the files issued under it, in ``root``."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    root: Path
    ca: trustme.CA = field(default_factory=trustme.CA)

    @classmethod
    def create(cls, root: Path) -> TestPKI:
        root.mkdir(parents=True, exist_ok=True)
        pki = cls(root)
        _write(pki.ca_file, pki.ca.cert_pem.bytes())
        return pki

    @property
    def ca_file(self) -> Path:
        return self.root / "ca.pem"

    def server(
        self,
        *names: str,
        cert: Path | None = None,
        key: Path | None = None,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> tuple[Path, Path, int]:
        """Issue a server certificate for ``names`` (default 127.0.0.1) into ``cert``/``key``
        (default ``server-cert.pem``/``server-key.pem``); return the paths and its serial."""
        leaf = self.ca.issue_cert(
            *(names or ("127.0.0.1",)), not_before=not_before, not_after=not_after
        )
        cert = cert or self.root / "server-cert.pem"
        key = key or self.root / "server-key.pem"
        _write(key, leaf.private_key_pem.bytes())
        _write(cert, b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
        serial = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number
        return cert, key, serial

    def client(self, name: str = "client") -> tuple[Path, Path]:
        """Issue a client certificate; return its certificate and key files."""
        leaf = self.ca.issue_cert(f"{name}@ferry.test")
        cert, key = self.root / f"{name}-cert.pem", self.root / f"{name}-key.pem"
        _write(key, leaf.private_key_pem.bytes())
        _write(cert, b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
        return cert, key


def presented_serial(address: str, ca_file: Path, timeout: float = 5.0) -> int:
    """The serial number of the certificate a new TLS connection to ``host:port`` gets."""
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context(cafile=str(ca_file))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number
