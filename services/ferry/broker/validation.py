"""Checks on what clients send, pure: each raises errors.InvalidArgument with a reason.

Everything a request carries is checked here before the domain looks at it, so that nothing a
client sends reaches code that could fail on it (a log line with a traceback, an INTERNAL): every
enum value must be one the schema defines (proto3 keeps unknown numbers as plain ints), every
int its range, every string and byte field its length, every repeated field its count, and a
manifest its serialized size.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence

from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from ferry.broker.errors import InvalidArgument, Reason
from ferry.v1 import broker_pb2

MAX_FILES = 10_000
MAX_PATH_CHARS = 4096
MAX_TOTAL_BYTES = 1 << 40  # 1 TiB
MIN_CHUNK_BYTES = 64 << 10
MAX_CHUNK_BYTES = 64 << 20
MAX_CERTIFICATE_BYTES = 16 << 10
MAX_CANDIDATES = 32
#: Ports of one published candidate: the receiver's one per stream (stream_count <= 64).
MAX_CANDIDATE_PORTS = 64
MAX_HOST_ID_CHARS = 256
MAX_REASON_CHARS = 1024
MAX_KEY_FIELD_BYTES = 64  # a SPAKE2 message is 33 bytes, a MAC or verifier 32
MAX_REQUEST_ID_CHARS = 128
MAX_NAME_CHARS = 256  # `sessions/` and a 32-character hex id
MAX_CODE_CHARS = 256  # a nameplate is a number and a word
MAX_MODE = 0o7777  # permission bits only: no file type bits
# google.protobuf.Timestamp's range, 0001-01-01 to 9999-12-31 (what every reader can convert).
_MIN_TIMESTAMP_S = -62_135_596_800
_MAX_TIMESTAMP_S = 253_402_300_799
# google.protobuf.Duration's range, about +-10,000 years.
_MAX_DURATION_S = 315_576_000_000


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


def check_manifest(manifest: broker_pb2.Manifest, max_bytes: int | None = None) -> None:
    """1..10000 files with safe distinct paths, sizes >= 0, total <= 1 TiB, sane chunk size,
    permission bits only, valid times, and (given ``max_bytes``) at most that many bytes
    serialized.

    The byte bound is what a manifest costs the broker: it is stored with the session and sent
    in every update of every watch, so its size, not only its file count, is what is limited.
    """
    if max_bytes is not None and manifest.ByteSize() > max_bytes:
        raise _manifest_error(
            f"the manifest is {manifest.ByteSize()} bytes, more than this broker's limit of"
            f" {max_bytes}; offer fewer files at once (or shorter paths)"
        )
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
        if entry.mode > MAX_MODE:
            raise _manifest_error(f"file {entry.path!r} has a mode beyond permission bits")
        if entry.HasField("modify_time") and not timestamp_in_range(entry.modify_time):
            raise _manifest_error(f"file {entry.path!r} has a modify_time out of range")
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
    check_candidates(peer.candidates, side)
    if len(peer.host_id) > MAX_HOST_ID_CHARS:
        raise InvalidArgument(Reason.INVALID_PEER, f"the {side}'s host_id is too long")
    for field in ("pake_message", "key_confirmation", "certificate_mac"):
        check_key_field(getattr(peer, field), f"the {side}'s {field}")


def check_candidates(
    candidates: Sequence[broker_pb2.Candidate], side: str, *, ported: bool = False
) -> None:
    """At most MAX_CANDIDATES, each an IP address of a known kind; ``ported`` (published for
    an attempt): each with 1 to MAX_CANDIDATE_PORTS ports in 1-65535, else with none."""
    if len(candidates) > MAX_CANDIDATES:
        raise InvalidArgument(
            Reason.INVALID_PEER, f"the {side} lists more than {MAX_CANDIDATES} addresses"
        )
    for candidate in candidates:
        check_enum(
            candidate.kind, broker_pb2.Candidate.Kind.DESCRIPTOR, f"the {side}'s candidate kind"
        )
        try:
            ipaddress.ip_address(candidate.ip)
        except ValueError:
            raise InvalidArgument(
                Reason.INVALID_PEER, f"the {side}'s candidate {candidate.ip!r} is not an IP address"
            ) from None
        ports = candidate.ports
        if not ported and ports:
            raise InvalidArgument(
                Reason.INVALID_PEER, f"the {side}'s candidate {candidate.ip} has ports here"
            )
        if ported and not 1 <= len(ports) <= MAX_CANDIDATE_PORTS:
            raise InvalidArgument(
                Reason.INVALID_PEER,
                f"the {side}'s candidate {candidate.ip} needs 1 to {MAX_CANDIDATE_PORTS} ports",
            )
        if any(not 1 <= port <= 65535 for port in ports):
            raise InvalidArgument(
                Reason.INVALID_PEER,
                f"the {side}'s candidate {candidate.ip} has a port not in 1-65535",
            )


def check_key_field(value: bytes, what: str) -> None:
    """A PAKE message, MAC or verifier: opaque to the broker, but short."""
    if len(value) > MAX_KEY_FIELD_BYTES:
        raise InvalidArgument(
            Reason.INVALID_ARGUMENT, f"{what} is longer than {MAX_KEY_FIELD_BYTES} bytes"
        )


def check_enum(value: int, enum: EnumDescriptor, what: str) -> None:
    """A value the enum defines: proto3 keeps any other number as it came, so check it here."""
    if enum.values_by_number.get(value) is None:
        raise InvalidArgument(Reason.INVALID_ARGUMENT, f"{what} is not a known value ({value})")


def check_state(state: int) -> None:
    """A Session.State the schema defines (which ones a call may name is the lifecycle's say)."""
    check_enum(state, broker_pb2.Session.State.DESCRIPTOR, "state")


def check_length(value: str | bytes, limit: int, what: str) -> None:
    """A string or byte field of at most ``limit`` characters (or bytes)."""
    if len(value) > limit:
        raise InvalidArgument(Reason.INVALID_ARGUMENT, f"{what} is longer than {limit}")


def check_name(name: str) -> None:
    """A session name of sane length (whether it exists is for the store to say)."""
    check_length(name, MAX_NAME_CHARS, "name")


def check_request_id(request_id: str) -> None:
    """A client-chosen request id of at most 128 characters."""
    check_length(request_id, MAX_REQUEST_ID_CHARS, "request_id")


def timestamp_in_range(ts: Timestamp) -> bool:
    """Whether ``ts`` is within google.protobuf.Timestamp's documented range."""
    return _MIN_TIMESTAMP_S <= ts.seconds <= _MAX_TIMESTAMP_S and 0 <= ts.nanos <= 999_999_999


def check_duration(duration: Duration, what: str) -> None:
    """A google.protobuf.Duration within its documented range, seconds and nanos of one sign."""
    seconds, nanos = duration.seconds, duration.nanos
    if (
        abs(seconds) > _MAX_DURATION_S
        or abs(nanos) > 999_999_999
        or (seconds > 0 and nanos < 0)
        or (seconds < 0 and nanos > 0)
    ):
        raise InvalidArgument(Reason.INVALID_ARGUMENT, f"{what} is not a valid duration")


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
    return _normal_ip(host.partition("%")[0])


@functools.lru_cache(maxsize=4096)  # on every call: about 3 % of a negotiation's CPU
def _normal_ip(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


#: The routes a PathReport may name.
PATH_ROUTES = frozenset({"", "host", "punched", "store"})
MAX_ENDPOINT_CHARS = 64  # "[v6 address]:port"


def check_path_report(path: broker_pb2.PathReport) -> None:
    """A receiver's PathReport: a known route, short endpoints and reason, a valid duration."""
    if path.route not in PATH_ROUTES:
        raise InvalidArgument(
            Reason.INVALID_ARGUMENT,
            f"path route {path.route[:16]!r} is not one of host, punched, store",
        )
    check_length(path.local, MAX_ENDPOINT_CHARS, "path local")
    check_length(path.remote, MAX_ENDPOINT_CHARS, "path remote")
    check_reason(path.reason)
    check_duration(path.setup, "path setup")
