"""The broker address says the channel's security (ferry.client._channel), and the client's
TLS settings are checked before anything is sent."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from ferry.client import BrokerSettingsError, Client
from ferry.client._channel import (
    BrokerAddress,
    ChannelTLS,
    channel_credentials,
    is_loopback_host,
    parse_broker_address,
    root_certificates,
    system_root_certificates,
)

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The scheme decides.
        ("grpcs://broker.example:50051", BrokerAddress("broker.example", 50051, tls=True)),
        ("grpcs://127.0.0.1:50051", BrokerAddress("127.0.0.1", 50051, tls=True)),
        ("GRPCS://broker.example:7", BrokerAddress("broker.example", 7, tls=True)),
        ("grpcs://broker.example", BrokerAddress("broker.example", 443, tls=True)),
        ("grpcs://broker.example:50051/", BrokerAddress("broker.example", 50051, tls=True)),
        ("grpc://127.0.0.1:50051", BrokerAddress("127.0.0.1", 50051, tls=False)),
        ("grpc://localhost:50051", BrokerAddress("localhost", 50051, tls=False)),
        ("grpc://[::1]:50051", BrokerAddress("::1", 50051, tls=False)),
        # Bare: TLS unless loopback.
        ("broker.example:50051", BrokerAddress("broker.example", 50051, tls=True)),
        ("10.0.0.5:50051", BrokerAddress("10.0.0.5", 50051, tls=True)),
        ("[2001:db8::1]:50051", BrokerAddress("2001:db8::1", 50051, tls=True)),
        ("127.0.0.1:50051", BrokerAddress("127.0.0.1", 50051, tls=False)),
        ("127.3.2.1:50051", BrokerAddress("127.3.2.1", 50051, tls=False)),
        ("localhost:50051", BrokerAddress("localhost", 50051, tls=False)),
        ("LOCALHOST.:50051", BrokerAddress("LOCALHOST.", 50051, tls=False)),
        ("[::1]:50051", BrokerAddress("::1", 50051, tls=False)),
        (" 127.0.0.1:1 ", BrokerAddress("127.0.0.1", 1, tls=False)),
    ],
)
def test_the_form_says_the_security(text: str, expected: BrokerAddress) -> None:
    assert parse_broker_address(text) == expected


def test_target_and_display() -> None:
    v6 = parse_broker_address("grpcs://[2001:db8::1]:443")
    assert v6.target == "[2001:db8::1]:443"
    assert str(v6) == "grpcs://[2001:db8::1]:443"
    assert str(parse_broker_address("127.0.0.1:5")) == "grpc://127.0.0.1:5"


@pytest.mark.parametrize(
    "text", ["grpc://broker.example:50051", "grpc://10.0.0.5:1", "grpc://[2001:db8::1]:1"]
)
def test_plaintext_off_loopback_only_when_asked(text: str) -> None:
    refused = "refusing plaintext to the broker at .*FERRY_INSECURE_PLAINTEXT=1"
    with pytest.raises(BrokerSettingsError, match=refused):
        parse_broker_address(text)
    assert not parse_broker_address(text, insecure_plaintext=True).tls


@pytest.mark.parametrize(
    "text",
    [
        "",
        "broker.example",  # no port
        "grpc://127.0.0.1",  # no port (only grpcs:// has a default)
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:http",
        "::1:50051",  # IPv6 without brackets
        "[::1:50051",
        "[::1]50051",
        "https://broker.example:443",
        "grpcs://broker.example:1/path",
        ":50051",
        "bro ker:1",
    ],
)
def test_malformed_addresses(text: str) -> None:
    with pytest.raises(BrokerSettingsError, match="not a broker address"):
        parse_broker_address(text)


def test_settings_errors_are_value_errors() -> None:
    assert issubclass(BrokerSettingsError, ValueError)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("localhost.example", False),
        ("broker", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_the_client_checks_its_settings_before_any_call(tmp_path: Path) -> None:
    with pytest.raises(BrokerSettingsError, match="refusing plaintext"):
        Client("grpc://broker.example:50051")
    with pytest.raises(BrokerSettingsError, match="go together"):
        Client("grpcs://broker.example:50051", broker_cert=tmp_path / "c.pem")
    Client("grpc://broker.example:50051", insecure_plaintext=True)  # asked for: allowed


def test_system_trust_store_is_openssls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    default = ssl.get_default_verify_paths()
    roots = system_root_certificates()
    if default.cafile:
        assert roots is not None
        assert Path(default.cafile).read_bytes().strip() in roots
    # SSL_CERT_FILE moves it, as it does for OpenSSL.
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    system_root_certificates.cache_clear()
    try:
        assert system_root_certificates() == bundle.read_bytes()
        assert root_certificates(ChannelTLS()) == bundle.read_bytes()
        # A given CA file replaces the system's.
        ca = tmp_path / "ca.pem"
        ca.write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIC\n-----END CERTIFICATE-----\n")
        assert root_certificates(ChannelTLS(ca_file=ca)) == ca.read_bytes()
    finally:
        system_root_certificates.cache_clear()


def test_unusable_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(BrokerSettingsError, match=r"cannot read the broker CA file .*missing"):
        channel_credentials(ChannelTLS(ca_file=tmp_path / "missing.pem"))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(BrokerSettingsError, match="is not PEM"):
        channel_credentials(ChannelTLS(ca_file=junk))
