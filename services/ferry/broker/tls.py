"""TLS on the broker's gRPC port: server credentials from PEM files, renewed without a restart.

::

    --tls-cert, --tls-key [, --tls-client-ca]     (paths; BrokerConfig.tls_*)
            |  load(): read all files once, check the key is the certificate's, parse the CAs
            v
    grpc.dynamic_ssl_server_credentials(first config, fetch)
            |  gRPC calls fetch() before every new TLS handshake:
            v
    fetch(): stat the files (inode, size, mtime) -> unchanged: None (keep serving the same)
                                                 -> changed: load() -> the new configuration
                                                               (bad or half-written: keep the
                                                                old one, warn once, try again)

So a renewed certificate (cert-manager rewriting a mounted Secret, certbot, a `cp`) is served
to the next new connection; connections already open keep theirs. With a client CA, every
client must show a certificate that it issued (mutual TLS).

No secret is logged: only the certificate's serial number, subject names and expiry.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import threading
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

__all__ = ["CertificateFiles", "TLSFileError", "describe"]

log = logging.getLogger(__name__)

_Stamp = tuple[tuple[int, int, int, int], ...]


class TLSFileError(OSError):
    """A TLS file cannot be used: unreadable, not PEM, or a key that is not the certificate's."""


@dataclasses.dataclass(frozen=True, slots=True)
class Loaded:
    """One consistent reading of the files."""

    configuration: grpc.ServerCertificateConfiguration
    serial: int
    names: tuple[str, ...]
    not_after: datetime.datetime


class CertificateFiles:
    """The broker's certificate, key and optional client CA, as gRPC server credentials that
    follow the files (see the module docstring)."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.cert, self.key, self.client_ca = Path(cert), Path(key), client_ca
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self.current = self.load()  # raises TLSFileError: a broker without its cert won't start
        self._failed: _Stamp | None = None
        self._warn_expiry(self.current)

    @property
    def paths(self) -> tuple[Path, ...]:
        """Every file the credentials come from."""
        return (self.cert, self.key) + ((self.client_ca,) if self.client_ca else ())

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that call :meth:`fetch` before each new handshake."""
        return grpc.dynamic_ssl_server_credentials(
            self.current.configuration,
            self.fetch,  # type: ignore[arg-type]  # the stubs forget "or None for no change"
            require_client_authentication=self.client_ca is not None,
        )

    def _stat(self) -> _Stamp:
        stamps = []
        for path in self.paths:
            try:
                st = os.stat(path)  # follows symlinks: a Secret volume swaps `..data`
            except OSError:
                stamps.append((0, 0, -1, 0))
            else:
                stamps.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(stamps)

    def load(self) -> Loaded:
        """Read and check the files; TLSFileError if they are not a usable pair (and CAs)."""
        chain_pem = _read(self.cert, "certificate")
        key_pem = _read(self.key, "private key")
        try:
            chain = x509.load_pem_x509_certificates(chain_pem)
        except ValueError as exc:
            raise TLSFileError(f"{self.cert}: not a PEM certificate ({exc})") from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise TLSFileError(f"{self.key}: not an unencrypted PEM private key ({exc})") from None
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if key.public_key().public_bytes(der, public) != chain[0].public_key().public_bytes(
            der, public
        ):
            raise TLSFileError(f"{self.key} is not the private key of {self.cert}")
        roots = None
        if self.client_ca is not None:
            roots = _read(self.client_ca, "client CA")
            try:
                x509.load_pem_x509_certificates(roots)
            except ValueError as exc:
                raise TLSFileError(f"{self.client_ca}: not a PEM certificate ({exc})") from None
        configuration = grpc.ssl_server_certificate_configuration(
            [(key_pem, chain_pem)], root_certificates=roots
        )
        return Loaded(configuration, chain[0].serial_number, _names(chain[0]), _expiry(chain[0]))

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate-configuration fetcher: a new configuration when the files
        changed and make a usable one, else None (serve on with the current one). Never
        raises: it runs inside gRPC, before every handshake."""
        try:
            with self._lock:
                stamp = self._stat()
                if stamp == self._stamp:
                    return None
                try:
                    loaded = self.load()
                except TLSFileError as exc:
                    if stamp != self._failed:  # once per change, not once per connection
                        self._failed = stamp
                        log.warning("TLS files not usable yet, certificate kept: %s", exc)
                    return None
                if self._stat() != stamp:
                    return None  # changed while being read: take it on the next connection
                self._stamp, self.current, self._failed = stamp, loaded, None
            log.info("TLS certificate reloaded: %s", describe(loaded))
            self._warn_expiry(loaded)
            return loaded.configuration
        except Exception:  # grpc would swallow it and fail the handshake: keep serving
            log.exception("TLS certificate reload failed; keeping the current certificate")
            return None

    @staticmethod
    def _warn_expiry(loaded: Loaded) -> None:
        if loaded.not_after <= datetime.datetime.now(datetime.UTC):
            log.warning("the TLS certificate expired on %s", loaded.not_after.isoformat())


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TLSFileError(f"cannot read the TLS {what} {path}: {exc.strerror or exc}") from None


def _names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(str(v) for v in sans.get_values_for_type(x509.DNSName)) + tuple(
        str(v) for v in sans.get_values_for_type(x509.IPAddress)
    )


def _expiry(cert: x509.Certificate) -> datetime.datetime:
    return cert.not_valid_after_utc


def describe(loaded: Loaded) -> str:
    """The certificate for a log line: serial, names, expiry."""
    return (
        f"serial {loaded.serial:x}, names {', '.join(loaded.names) or '(none)'}, "
        f"expires {loaded.not_after.isoformat()}"
    )
