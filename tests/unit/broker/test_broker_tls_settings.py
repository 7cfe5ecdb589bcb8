"""The broker's TLS settings (BrokerConfig) and its certificate files (ferry.broker.tls),
without a server: plaintext only on loopback, and a fetcher that follows renewed files."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc
import pytest

from ferry.broker.config import BrokerConfig, is_loopback
from ferry.broker.tls import CertificateFiles, TLSFileError
from tests.support.tls import TestPKI

pytestmark = pytest.mark.timeout(30)

CERT, KEY = Path("/tls/tls.crt"), Path("/tls/tls.key")


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:0", "127.9.9.9:50051", "[::1]:50051", "localhost:50051"]
)
def test_plaintext_on_loopback_is_the_default(listen: str) -> None:
    assert not BrokerConfig(listen=listen).tls


@pytest.mark.parametrize("listen", ["0.0.0.0:50051", "[::]:50051", "10.1.2.3:50051", ":50051"])
def test_plaintext_elsewhere_is_refused_unless_asked(listen: str) -> None:
    with pytest.raises(ValueError, match="refusing plaintext gRPC on listen"):
        BrokerConfig(listen=listen)
    assert not BrokerConfig(listen=listen, insecure_plaintext=True).tls
    assert BrokerConfig(listen=listen, tls_cert=CERT, tls_key=KEY).tls


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tls_cert": CERT}, "tls_cert and tls_key go together"),
        ({"tls_key": KEY}, "tls_cert and tls_key go together"),
        ({"tls_client_ca": CERT}, "tls_client_ca needs tls_cert and tls_key"),
        (
            {"tls_cert": CERT, "tls_key": KEY, "insecure_plaintext": True},
            "insecure_plaintext contradicts tls_cert",
        ),
        ({"health_listen": "50052"}, "health_listen must be host:port"),
    ],
)
def test_inconsistent_tls_settings(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BrokerConfig(**settings)  # type: ignore[arg-type]


def test_a_name_is_loopback_only_if_all_its_addresses_are() -> None:
    assert is_loopback("localhost:1")
    assert not is_loopback("name.invalid:1")  # does not resolve: not loopback


def _files(pki: TestPKI, client_ca: bool = False) -> tuple[CertificateFiles, Path, Path, int]:
    cert, key, serial = pki.server("127.0.0.1")
    return CertificateFiles(cert, key, pki.ca_file if client_ca else None), cert, key, serial


def test_load_checks_the_pair(pki: TestPKI, tmp_path: Path) -> None:
    files, cert, key, serial = _files(pki)
    assert files.current.serial == serial
    assert "127.0.0.1" in files.current.names
    other_cert, _, _ = pki.server("127.0.0.1", cert=tmp_path / "o.crt", key=tmp_path / "o.key")
    with pytest.raises(TLSFileError, match="is not the private key of"):
        CertificateFiles(other_cert, key)
    with pytest.raises(TLSFileError, match="cannot read the TLS certificate"):
        CertificateFiles(tmp_path / "missing.crt", key)
    junk = tmp_path / "junk.pem"
    junk.write_text("junk")
    with pytest.raises(TLSFileError, match="not a PEM certificate"):
        CertificateFiles(cert, key, junk)
    assert issubclass(TLSFileError, OSError)  # the CLIs print it as one line, exit 1


def test_fetch_follows_the_files(pki: TestPKI, caplog: pytest.LogCaptureFixture) -> None:
    files, cert, key, first = _files(pki, client_ca=True)
    assert isinstance(files.credentials(), grpc.ServerCredentials)
    assert files.fetch() is None  # unchanged: gRPC keeps what it has
    # A half-written renewal (new certificate, old key): kept, said once.
    cert.write_bytes(pki.ca.issue_cert("127.0.0.1").cert_chain_pems[0].bytes())
    with caplog.at_level(logging.WARNING, "ferry.broker.tls"):
        assert files.fetch() is None
        assert files.fetch() is None
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "TLS files not usable yet, certificate kept"
    ]
    assert files.current.serial == first
    # The whole renewal: the next handshake gets the new configuration.
    _, _, second = pki.server("127.0.0.1", cert=cert, key=key)
    new = files.fetch()
    assert isinstance(new, grpc.ServerCertificateConfiguration)
    assert files.current.serial == second != first
    assert files.fetch() is None
    # Removed files (a Secret being swapped): kept too.
    os.remove(cert)
    assert files.fetch() is None
    assert files.current.serial == second
