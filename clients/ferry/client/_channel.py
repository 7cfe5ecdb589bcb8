"""The channel to the broker: what an address says about its security, and the credentials.

The address form says whether the channel is TLS::

    grpcs://HOST[:PORT]   TLS (port 443 if left out)
    grpc://HOST:PORT      plaintext; only to a loopback host (127.0.0.0/8, ::1, localhost),
                          elsewhere only with ``insecure_plaintext`` (FERRY_INSECURE_PLAINTEXT=1)
    HOST:PORT             TLS, unless HOST is loopback: then plaintext, as a local broker
                          started without a certificate serves it
    [v6]:PORT             IPv6 literals go in brackets, in every form

A TLS channel checks the broker's certificate (its chain and that it names HOST) against the
system's trust store, the one OpenSSL would use (``ssl.get_default_verify_paths()``:
SSL_CERT_FILE / SSL_CERT_DIR, else the distribution's bundle), not gRPC's own bundled roots;
or against ``ca_file`` alone when one is given. ``cert_file`` + ``key_file`` are this client's
certificate, for a broker that requires one (mutual TLS).

Everything here is pure but :func:`open_channel`, which builds the grpc.aio channel. Why a
channel fails its handshake is found by `_tlsprobe`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import ipaddress
import os
import re
import ssl
from pathlib import Path

import grpc
import grpc.aio

from ferry.errors import FerryError

__all__ = [
    "BrokerAddress",
    "BrokerSettingsError",
    "ChannelTLS",
    "channel_credentials",
    "is_loopback_host",
    "open_channel",
    "parse_broker_address",
    "root_certificates",
    "system_root_certificates",
]

_SCHEMES = {"grpcs": True, "grpc": False}
_DEFAULT_TLS_PORT = 443
#: Names OpenSSL gives the certificates of a hashed CA directory (c_rehash): 8 hex digits.
_HASHED_NAME = re.compile(r"^[0-9a-f]{8}\.r?\d+$")
_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?-----END CERTIFICATE-----", re.S)
_OPTIONS = [
    ("grpc.enable_retries", 1),
    ("grpc.keepalive_time_ms", 30_000),
    # Come back quickly after a broker restart (the default backoff grows to 2 min).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


class BrokerSettingsError(FerryError, ValueError):
    """The broker's address or this client's TLS settings cannot be used: a malformed
    address, plaintext to a host that is not loopback, a certificate without its key, a CA
    file that cannot be read. Nothing was sent."""


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerAddress:
    """A parsed broker address: ``host`` (without brackets), ``port``, and ``tls``."""

    host: str
    port: int
    tls: bool

    @property
    def target(self) -> str:
        """``host:port`` as gRPC and sockets want it (an IPv6 literal in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{'grpcs' if self.tls else 'grpc'}://{self.target}"


@dataclasses.dataclass(frozen=True, slots=True)
class ChannelTLS:
    """How this client secures its channel to the broker (see the module docstring)."""

    #: Trust only these CA certificates (PEM) instead of the system's.
    ca_file: Path | None = None
    #: This client's certificate chain and key (PEM), for a broker that asks for one.
    cert_file: Path | None = None
    key_file: Path | None = None
    #: Allow ``grpc://`` to a host that is not loopback (tokens and codes in clear).
    insecure_plaintext: bool = False

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise BrokerSettingsError(
                "a client certificate needs its key, and a key its certificate "
                "(--broker-cert and --broker-key go together)"
            )


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` is this machine by its name alone: ``localhost``, 127.0.0.0/8, ::1.
    Nothing is resolved."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _split_host_port(text: str, original: str) -> tuple[str, str]:
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise BrokerSettingsError(f"not a broker address: {original!r} (e.g. [::1]:50051)")
        return host, rest[1:]
    host, colon, port = text.rpartition(":")
    if not colon:
        return text, ""
    if ":" in host:
        raise BrokerSettingsError(
            f"not a broker address: {original!r} (put an IPv6 address in brackets: [::1]:50051)"
        )
    return host, port


def parse_broker_address(text: str, *, insecure_plaintext: bool = False) -> BrokerAddress:
    """The address, with the security its form says (see the module docstring).

    BrokerSettingsError for a malformed address, or ``grpc://`` to a host that is not
    loopback without ``insecure_plaintext``.
    """
    original = text
    text = text.strip()
    scheme = ""
    if "://" in text:
        scheme, _, text = text.partition("://")
        scheme = scheme.lower()
        if scheme not in _SCHEMES:
            raise BrokerSettingsError(
                f"not a broker address: {original!r} (grpcs://HOST:PORT, grpc://HOST:PORT or "
                "HOST:PORT)"
            )
        text = text.rstrip("/")
    host, port_text = _split_host_port(text, original)
    if not host or "/" in host or any(c.isspace() for c in host):
        raise BrokerSettingsError(f"not a broker address: {original!r} (HOST:PORT)")
    if not port_text and scheme == "grpcs":
        port = _DEFAULT_TLS_PORT
    else:
        try:
            port = int(port_text)
        except ValueError:
            port = 0
        if not 1 <= port <= 65535:
            raise BrokerSettingsError(
                f"not a broker address: {original!r} (needs a port: HOST:PORT)"
            )
    loopback = is_loopback_host(host)
    tls = _SCHEMES[scheme] if scheme else not loopback
    if not tls and not loopback and not insecure_plaintext:
        raise BrokerSettingsError(
            f"refusing plaintext to the broker at {original.strip()}, which is not on this "
            "machine: the party token and the code would cross the network in clear. Use "
            "grpcs:// (TLS), or set FERRY_INSECURE_PLAINTEXT=1 (--insecure-plaintext) to "
            "allow it anyway"
        )
    return BrokerAddress(host, port, tls)


@functools.cache
def system_root_certificates() -> bytes | None:
    """The system's CA certificates (PEM), as OpenSSL finds them; None if it has none.

    The bundle file (SSL_CERT_FILE, else OpenSSL's default) is read; the hashed directory
    (SSL_CERT_DIR, else OpenSSL's default) too when SSL_CERT_DIR is set or there is no
    bundle (on Debian-like systems the default directory holds the bundle's certificates
    again). Read once per process.
    """
    paths = ssl.get_default_verify_paths()
    chunks: list[bytes] = []
    if paths.cafile:
        with contextlib.suppress(OSError):
            chunks.append(Path(paths.cafile).read_bytes())
    if paths.capath and (not chunks or os.environ.get("SSL_CERT_DIR")):
        try:
            names = sorted(n for n in os.listdir(paths.capath) if _HASHED_NAME.match(n))
        except OSError:
            names = []
        for name in names:
            try:
                data = (Path(paths.capath) / name).read_bytes()
            except OSError:
                continue
            if b"-----BEGIN CERTIFICATE-----" in data:
                chunks.append(data)
    if len(chunks) <= 1:
        return chunks[0] if chunks and chunks[0].strip() else None
    # One copy of each certificate (the bundle and the directory often hold the same ones).
    blocks = dict.fromkeys(m[0] for chunk in chunks for m in _PEM_BLOCK.finditer(chunk))
    return b"\n".join(blocks) + b"\n" if blocks else None


def _read(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BrokerSettingsError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise BrokerSettingsError(f"the {what} {path} is not PEM")
    return data


def root_certificates(tls: ChannelTLS) -> bytes | None:
    """The CA certificates (PEM) the broker's certificate is checked against: ``ca_file``,
    else the system's (None: there are none, and gRPC falls back to its own bundle)."""
    if tls.ca_file is not None:
        return _read(tls.ca_file, "broker CA file")
    return system_root_certificates()


def channel_credentials(tls: ChannelTLS) -> grpc.ChannelCredentials:
    """gRPC's TLS credentials for ``tls``; the files are read now (BrokerSettingsError)."""
    key = cert = None
    if tls.cert_file is not None and tls.key_file is not None:
        cert = _read(tls.cert_file, "client certificate")
        key = _read(tls.key_file, "client key")
    return grpc.ssl_channel_credentials(
        root_certificates=root_certificates(tls), private_key=key, certificate_chain=cert
    )


def open_channel(address: BrokerAddress, tls: ChannelTLS) -> grpc.aio.Channel:
    """A grpc.aio channel to ``address``: TLS or plaintext, as the address says."""
    if not address.tls:
        return grpc.aio.insecure_channel(address.target, options=_OPTIONS)
    return grpc.aio.secure_channel(address.target, channel_credentials(tls), options=_OPTIONS)
