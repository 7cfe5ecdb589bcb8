"""Ephemeral certificates and pinned, mutually authenticated TLS for the data channel.

Each side makes a fresh key and a self-signed certificate for one transfer and gives only
the certificate to the broker; the broker hands it to the other side. Each TLS context
trusts exactly the other side's certificate (TLS 1.3, both sides present certificates),
and after the handshake the peer's certificate is compared byte for byte with the pinned
one. Nothing secret crosses the broker, and a man in the middle would need the private
key that never left the peer.
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["Identity", "PeerAuthError", "client_context", "server_context", "verify_peer"]

_VALIDITY = datetime.timedelta(days=2)


class PeerAuthError(Exception):
    """The peer did not present the certificate the broker introduced."""


@dataclass(frozen=True)
class Identity:
    """This side's ephemeral key and certificate, in PEM and DER."""

    key_pem: bytes
    cert_pem: bytes
    cert_der: bytes

    @classmethod
    def generate(cls) -> Identity:
        """Make a fresh P-256 key and a self-signed certificate for it."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ferry-peer")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(
            key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            cert_der=cert.public_bytes(serialization.Encoding.DER),
        )


def _context(purpose: ssl.Purpose, me: Identity, peer_der: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(
        ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        peer_pem = x509.load_der_x509_certificate(peer_der).public_bytes(serialization.Encoding.PEM)
    except ValueError as exc:
        raise PeerAuthError("the peer's certificate from the broker is not valid") from exc
    ctx.load_verify_locations(cadata=peer_pem.decode("ascii"))
    # load_cert_chain only reads files; an in-memory key goes through a private temp file.
    _load_identity(ctx, me)
    return ctx


def _load_identity(ctx: ssl.SSLContext, me: Identity) -> None:
    import os
    import tempfile

    fd, path = tempfile.mkstemp(prefix="ferry-id-", suffix=".pem")
    try:
        os.write(fd, me.key_pem + me.cert_pem)
        os.close(fd)
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)


def server_context(me: Identity, peer_der: bytes) -> ssl.SSLContext:
    """The listening side's context: present ``me``, require exactly ``peer_der``."""
    return _context(ssl.Purpose.CLIENT_AUTH, me, peer_der)


def client_context(me: Identity, peer_der: bytes) -> ssl.SSLContext:
    """The dialing side's context: present ``me``, require exactly ``peer_der``."""
    return _context(ssl.Purpose.SERVER_AUTH, me, peer_der)


def verify_peer(sock: ssl.SSLSocket, peer_der: bytes) -> None:
    """After the handshake, check the peer presented the pinned certificate itself."""
    if sock.getpeercert(binary_form=True) != peer_der:
        raise PeerAuthError("the peer presented another certificate than the broker's")
