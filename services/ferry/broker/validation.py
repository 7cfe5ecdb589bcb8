"""Checks on what clients send, pure: each raises errors.InvalidArgument with a reason."""

from __future__ import annotations

import ipaddress

from ferry.broker.errors import InvalidArgument, Reason
from ferry.v1 import broker_pb2

MAX_FILES = 10_000
MAX_PATH_CHARS = 4096
MAX_TOTAL_BYTES = 1 << 40  # 1 TiB
MIN_CHUNK_BYTES = 64 << 10
MAX_CHUNK_BYTES = 64 << 20
MAX_CERTIFICATE_BYTES = 16 << 10
MAX_CANDIDATES = 32
MAX_HOST_ID_CHARS = 256
MAX_REASON_CHARS = 1024
MAX_KEY_FIELD_BYTES = 64  # a SPAKE2 message is 33 bytes, a MAC or verifier 32


def _manifest_error(message: str) -> InvalidArgument:
    return InvalidArgument(Reason.INVALID_MANIFEST, message)


def check_path(path: str) -> None:
    """A relative `/`-separated path with no empty, `.` or `..` segment, NUL or backslash."""
    if not path:
        raise _manifest_error("a file path is empty")
    if len(path) > MAX_PATH_CHARS:
        raise _manifest_error(f"a file path is longer than {MAX_PATH_CHARS} characters")
    if "\x00" in path or "\\" in path:
        raise _manifest_error(f"file path {path!r} contains NUL or a backslash")
    if path.startswith("/"):
        raise _manifest_error(f"file path {path!r} is absolute")
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            raise _manifest_error(f"file path {path!r} has an empty, '.' or '..' segment")


def check_manifest(manifest: broker_pb2.Manifest) -> None:
    """1..10000 files with safe distinct paths, sizes >= 0, total <= 1 TiB, sane chunk size."""
    if not 1 <= len(manifest.files) <= MAX_FILES:
        raise _manifest_error(f"a manifest needs 1 to {MAX_FILES} files")
    if not MIN_CHUNK_BYTES <= manifest.chunk_size_bytes <= MAX_CHUNK_BYTES:
        raise _manifest_error(
            f"chunk_size_bytes must be between {MIN_CHUNK_BYTES} and {MAX_CHUNK_BYTES}"
        )
    total = 0
    seen: set[str] = set()
    for entry in manifest.files:
        check_path(entry.path)
        if entry.path in seen:
            raise _manifest_error(f"file path {entry.path!r} appears twice")
        seen.add(entry.path)
        if entry.size_bytes < 0:
            raise _manifest_error(f"file {entry.path!r} has a negative size")
        total += entry.size_bytes
    if total > MAX_TOTAL_BYTES:
        raise _manifest_error(f"the files add up to more than {MAX_TOTAL_BYTES} bytes")


def check_peer(peer: broker_pb2.PeerInfo, side: str) -> None:
    """Certificate present and small, port range valid, candidates are IP addresses."""
    if not peer.certificate_der:
        raise InvalidArgument(Reason.INVALID_PEER, f"the {side}'s certificate is missing")
    if len(peer.certificate_der) > MAX_CERTIFICATE_BYTES:
        raise InvalidArgument(
            Reason.INVALID_PEER, f"the {side}'s certificate is larger than 16 KiB"
        )
    ports = peer.allowed_ports
    if not 1 <= ports.first_port <= ports.last_port <= 65535:
        raise InvalidArgument(
            Reason.INVALID_PEER,
            f"the {side}'s allowed_ports must satisfy 1 <= first_port <= last_port <= 65535",
        )
    if len(peer.candidates) > MAX_CANDIDATES:
        raise InvalidArgument(
            Reason.INVALID_PEER, f"the {side} lists more than {MAX_CANDIDATES} addresses"
        )
    for candidate in peer.candidates:
        try:
            ipaddress.ip_address(candidate.ip)
        except ValueError:
            raise InvalidArgument(
                Reason.INVALID_PEER, f"the {side}'s candidate {candidate.ip!r} is not an IP address"
            ) from None
    if len(peer.host_id) > MAX_HOST_ID_CHARS:
        raise InvalidArgument(Reason.INVALID_PEER, f"the {side}'s host_id is too long")
    for field in ("pake_message", "key_confirmation", "certificate_mac"):
        check_key_field(getattr(peer, field), f"the {side}'s {field}")


def check_key_field(value: bytes, what: str) -> None:
    """A PAKE message, MAC or verifier: opaque to the broker, but short."""
    if len(value) > MAX_KEY_FIELD_BYTES:
        raise InvalidArgument(
            Reason.INVALID_ARGUMENT, f"{what} is longer than {MAX_KEY_FIELD_BYTES} bytes"
        )


def check_reason(text: str) -> None:
    """A human reason string stays short."""
    if len(text) > MAX_REASON_CHARS:
        raise InvalidArgument(
            Reason.INVALID_ARGUMENT, f"reason is longer than {MAX_REASON_CHARS} chars"
        )


def peer_ip(peer: str) -> str | None:
    """The IP of a gRPC peer string (`ipv4:1.2.3.4:5678`, `ipv6:[::1]:5678`), else None."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        host = rest.rpartition(":")[0]
    elif kind == "ipv6":
        host = rest.rpartition(":")[0].removeprefix("[").removesuffix("]")
    else:
        return None
    try:
        return str(ipaddress.ip_address(host.partition("%")[0]))
    except ValueError:
        return None
