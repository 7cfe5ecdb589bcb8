"""STUN Binding over TCP (ferry.protocol.stun): RFC 5769's test vectors, round trips, and
every refusal of both sides' parsers."""

from __future__ import annotations

import hashlib
import hmac
import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferry.protocol.frames import RemoteProtocolError
from ferry.protocol.stun import (
    HEADER_SIZE,
    MAX_REQUEST_ATTRIBUTES,
    RequestReader,
    StunError,
    binding_request,
    binding_success,
    message_size,
    parse_binding_response,
)

pytestmark = pytest.mark.timeout(30)


def _hex(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# RFC 5769, typed from its text; the password of its short-term credential signs them all.
RFC5769_PASSWORD = b"VOkJxbRl1RmTxUk/WvJxBt"
RFC5769_TRANSACTION = _hex("b7e7a701 bc34d686 fa87dfae")
# 2.1 Sample Request: SOFTWARE, PRIORITY, ICE-CONTROLLED, USERNAME, MESSAGE-INTEGRITY,
# FINGERPRINT (the USERNAME padded with spaces, as the RFC has it).
RFC5769_REQUEST = _hex(
    """
    00010058 2112a442 b7e7a701 bc34d686 fa87dfae
    80220010 5354554e 20746573 7420636c 69656e74
    00240004 6e0001ff
    80290008 932ff9b1 51263b36
    00060009 6576746a 3a683676 59202020
    00080014 9aeaa70c bfd8cb56 781ef2b5 b2d3f249 c1b571a2
    80280004 e57a3bcf
    """
)
# 2.2 Sample IPv4 Response: SOFTWARE "test vector", XOR-MAPPED-ADDRESS 192.0.2.1:32853,
# MESSAGE-INTEGRITY, FINGERPRINT.
RFC5769_IPV4_RESPONSE = _hex(
    """
    0101003c 2112a442 b7e7a701 bc34d686 fa87dfae
    8022000b 74657374 20766563 746f7220
    00200008 0001a147 e112a643
    00080014 2b91f599 fd9e90c3 8c7489f9 2af9ba53 f06be7d7
    80280004 c07d4c96
    """
)
# 2.3 Sample IPv6 Response: the same with 2001:db8:1234:5678:11:2233:4455:6677 port 32853.
RFC5769_IPV6_RESPONSE = _hex(
    """
    01010048 2112a442 b7e7a701 bc34d686 fa87dfae
    8022000b 74657374 20766563 746f7220
    00200014 0002a147 0113a9fa a5d3f179 bc25f4b5 bed2b9d9
    00080014 a382954e 4be67bf1 1784c97c 8292c275 bfe3ed41
    80280004 c8fb0b4c
    """
)
VECTORS = [RFC5769_REQUEST, RFC5769_IPV4_RESPONSE, RFC5769_IPV6_RESPONSE]
TID = bytes(range(1, 13))


@pytest.mark.parametrize("message", VECTORS, ids=["request", "ipv4", "ipv6"])
def test_the_vectors_are_typed_right(message: bytes) -> None:
    """Each vector's own MESSAGE-INTEGRITY and FINGERPRINT (RFC 8489 14.5, 14.7) check out,
    so a typo in the bytes above would fail here rather than pass unnoticed."""
    integrity = len(message) - 8 - 24
    assert message[integrity : integrity + 4] == _hex("00080014")
    signed = message[:2] + struct.pack(">H", integrity + 24 - HEADER_SIZE) + message[4:integrity]
    mac = hmac.digest(RFC5769_PASSWORD, signed, hashlib.sha1)
    assert message[integrity + 4 : integrity + 24] == mac
    crc = zlib.crc32(message[:-8]) ^ 0x5354554E
    assert message[-4:] == struct.pack(">I", crc)


def test_rfc5769_ipv4_response() -> None:
    assert message_size(RFC5769_IPV4_RESPONSE[:HEADER_SIZE]) == len(RFC5769_IPV4_RESPONSE)
    got = parse_binding_response(RFC5769_IPV4_RESPONSE, RFC5769_TRANSACTION)
    assert got == ("192.0.2.1", 32853)


def test_rfc5769_ipv6_response() -> None:
    assert message_size(RFC5769_IPV6_RESPONSE[:HEADER_SIZE]) == len(RFC5769_IPV6_RESPONSE)
    got = parse_binding_response(RFC5769_IPV6_RESPONSE, RFC5769_TRANSACTION)
    assert got == ("2001:db8:1234:5678:11:2233:4455:6677", 32853)


def test_our_answers_are_the_vectors_xor_mapped_addresses() -> None:
    """binding_success encodes exactly the XOR-MAPPED-ADDRESS attributes of the vectors."""
    v4 = binding_success(RFC5769_TRANSACTION, "192.0.2.1", 32853)
    assert v4 == _hex("0101000c 2112a442") + RFC5769_TRANSACTION + RFC5769_IPV4_RESPONSE[36:48]
    v6 = binding_success(RFC5769_TRANSACTION, "2001:db8:1234:5678:11:2233:4455:6677", 32853)
    assert v6 == _hex("01010018 2112a442") + RFC5769_TRANSACTION + RFC5769_IPV6_RESPONSE[36:60]


def test_rfc5769_request_is_read_whole_and_byte_by_byte() -> None:
    reader = RequestReader()
    assert reader.wanted == HEADER_SIZE
    assert reader.feed(RFC5769_REQUEST[:HEADER_SIZE]) is None
    assert reader.wanted == len(RFC5769_REQUEST) - HEADER_SIZE  # the attributes, skipped
    assert reader.feed(RFC5769_REQUEST[HEADER_SIZE:]) == RFC5769_TRANSACTION
    assert reader.wanted == HEADER_SIZE  # ready for the next request
    got = [reader.feed(RFC5769_REQUEST[i : i + 1]) for i in range(len(RFC5769_REQUEST))]
    assert got == [None] * (len(RFC5769_REQUEST) - 1) + [RFC5769_TRANSACTION]


def test_binding_request_bytes() -> None:
    assert binding_request(TID) == _hex("00010000 2112a442") + TID
    reader = RequestReader()
    assert reader.feed(binding_request(TID)) == TID  # no attributes: one feed of 20 bytes


def test_requests_follow_each_other() -> None:
    reader = RequestReader()
    ids = [bytes([n]) * 12 for n in range(5)]
    stream = b"".join(binding_request(t) for t in ids)
    got = []
    while stream:
        piece, stream = stream[: reader.wanted], stream[reader.wanted :]
        if (tid := reader.feed(piece)) is not None:
            got.append(tid)
    assert got == ids


@pytest.mark.parametrize(
    ("ip", "port", "expected"),
    [
        ("127.0.0.1", 1, ("127.0.0.1", 1)),
        ("203.0.113.9", 65535, ("203.0.113.9", 65535)),
        ("::1", 40000, ("::1", 40000)),
        ("2001:db8::1", 3478, ("2001:db8::1", 3478)),
        ("::ffff:198.51.100.7", 5000, ("198.51.100.7", 5000)),  # a v4 peer on a v6 socket
        ("fe80::1%eth0", 6000, ("fe80::1", 6000)),  # the scope is the server's, not sent
    ],
)
def test_round_trip(ip: str, port: int, expected: tuple[str, int]) -> None:
    answer = binding_success(TID, ip, port)
    assert message_size(answer[:HEADER_SIZE]) == len(answer)
    assert parse_binding_response(answer, TID) == expected


def test_a_v4_mapped_peer_is_answered_as_ipv4() -> None:
    answer = binding_success(TID, "::ffff:198.51.100.7", 5000)
    assert answer == binding_success(TID, "198.51.100.7", 5000)
    assert answer[HEADER_SIZE + 5] == 1  # family IPv4
    assert len(answer) == HEADER_SIZE + 12


@given(
    tid=st.binary(min_size=12, max_size=12),
    ip=st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    port=st.integers(1, 65535),
)
def test_round_trip_any(tid: bytes, ip: object, port: int) -> None:
    got_ip, got_port = parse_binding_response(binding_success(tid, str(ip), port), tid)
    mapped = getattr(ip, "ipv4_mapped", None)
    assert (got_ip, got_port) == (str(mapped or ip), port)


@given(st.binary(max_size=200))
def test_any_bytes_give_requests_or_stun_errors(data: bytes) -> None:
    reader = RequestReader()
    try:
        while data:
            piece, data = data[: reader.wanted], data[reader.wanted :]
            reader.feed(piece)
    except StunError:
        pass


# -- the responder's refusals --------------------------------------------------------------


def _request(kind: int = 1, length: int = 0, cookie: int = 0x2112A442) -> bytes:
    return struct.pack(">HHI", kind, length, cookie) + TID


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"G", "first two bits are not zero"),  # GET / HTTP/1.1, refused on its first byte
        (b"\x16\x03\x01", "type 0x1603, not a Binding request"),  # a TLS ClientHello
        (b"\x80", "first two bits are not zero"),
        (b"\x00\x02", "type 0x0002, not a Binding request"),
        (b"\x01\x01", "type 0x0101, not a Binding request"),  # a response sent to us
        (b"\x00\x11", "type 0x0011, not a Binding request"),  # an indication
        (_request(cookie=0)[:5], "no magic cookie"),  # RFC 3489: no cookie
        (_request(cookie=0x2112A443), "no magic cookie"),
        (_request(length=2), "length of 2, not a multiple of 4"),
        (_request(length=MAX_REQUEST_ATTRIBUTES + 4), "516 bytes of attributes, over 512"),
    ],
)
def test_the_reader_refuses(data: bytes, message: str) -> None:
    reader = RequestReader()
    with pytest.raises(StunError, match=message):
        reader.feed(data)


def test_a_refusal_comes_on_the_first_wrong_byte() -> None:
    """The I/O layer reads what arrives; a wrong prefix is refused before 20 bytes are in."""
    reader = RequestReader()
    assert reader.feed(b"\x00\x01\x00\x00\x21") is None
    with pytest.raises(StunError, match="no magic cookie"):
        reader.feed(b"\x13")


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        (_hex("80220008 74657374"), "runs past the end"),  # says 8, has 4
        (_hex("00240004 6e0001ff 8022000d 74657374 20766563 746f7220"), "runs past the end"),
    ],
)
def test_the_reader_refuses_attributes_that_overrun(attributes: bytes, message: str) -> None:
    padded = attributes + bytes(-len(attributes) % 4)
    reader = RequestReader()
    assert reader.feed(_request(length=len(padded))) is None
    with pytest.raises(StunError, match=message):
        reader.feed(padded)


def test_the_reader_never_takes_more_than_wanted() -> None:
    reader = RequestReader()
    with pytest.raises(ValueError, match="wanted at most 20"):
        reader.feed(binding_request(TID) + b"\x00")
    small = RequestReader(max_attributes=8)
    with pytest.raises(StunError, match="over 8"):
        small.feed(_request(length=12))


def test_stun_errors_are_remote_protocol_errors() -> None:
    assert issubclass(StunError, RemoteProtocolError)


# -- the client's refusals -----------------------------------------------------------------


def _response(attributes: bytes, kind: int = 0x0101, tid: bytes = TID) -> bytes:
    return struct.pack(">HHI", kind, len(attributes), 0x2112A442) + tid + attributes


def _mapped(ip: bytes, port: int, family: int = 1) -> bytes:
    value = struct.pack(">BBH", 0, family, port) + ip
    return struct.pack(">HH", 0x0001, len(value)) + value


def test_mapped_address_when_there_is_no_xor_one() -> None:
    assert parse_binding_response(_response(_mapped(bytes([10, 1, 2, 3]), 4242)), TID) == (
        "10.1.2.3",
        4242,
    )
    v6 = bytes.fromhex("20010db8000000000000000000000001")
    assert parse_binding_response(_response(_mapped(v6, 4242, 2)), TID) == ("2001:db8::1", 4242)
    mapped_v4 = bytes.fromhex("00000000000000000000ffffc0000201")  # ::ffff:192.0.2.1
    assert parse_binding_response(_response(_mapped(mapped_v4, 1, 2)), TID) == ("192.0.2.1", 1)


def test_xor_mapped_address_wins_over_mapped_address() -> None:
    xored = binding_success(TID, "192.0.2.1", 32853)[HEADER_SIZE:]
    both = _mapped(bytes([10, 0, 0, 1]), 1) + xored
    assert parse_binding_response(_response(both), TID) == ("192.0.2.1", 32853)


def test_unknown_attributes_are_skipped_with_their_padding() -> None:
    unknown = _hex("7fff0001 ab000000 c0010005 0102030405000000 80220000")
    xored = binding_success(TID, "::1", 9)[HEADER_SIZE:]
    assert parse_binding_response(_response(unknown + xored), TID) == ("::1", 9)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x01\x01\x00\x00", "at least 20 bytes, not 4"),
        (_response(b"")[:-1], "at least 20 bytes, not 19"),
        (_response(b"") + b"\x00" * 4, "of 24 bytes whose header says 20"),
        (_response(b"", tid=bytes(12)), "answer to another transaction"),
        (_response(b"", kind=0x0001), "type 0x0001, not a Binding success response"),
        (_response(b"", kind=0x8101), "first two bits are not zero"),
        (_response(b"")[:4] + b"\x00\x00\x00\x00" + TID, "no magic cookie"),
        (_response(b""), "no mapped address"),
        (_response(_hex("00200008 0001a147")), "runs past the end"),
        (_response(_hex("0020")), "length of 2, not a multiple of 4"),
        (_response(_hex("00200000 00200004 00030000")), "cut off"),
        (_response(_hex("00200004 00030000")), "unknown family 3"),
        (_response(_hex("00200008 00020000 00000000")), "family 2 that is 8 bytes"),
        (_response(_mapped(bytes(4), 0)), "port 0"),
    ],
)
def test_the_client_refuses(data: bytes, message: str) -> None:
    with pytest.raises(StunError, match=message):
        parse_binding_response(data, TID)


def test_an_error_response_says_the_servers_error() -> None:
    reason = b"Unknown Attribute"
    code = struct.pack(">HBB", 0, 4, 20) + reason + bytes(-len(reason) % 4)
    error = _response(struct.pack(">HH", 0x0009, 4 + len(reason)) + code, kind=0x0111)
    with pytest.raises(
        StunError,
        match=r"^the STUN server refused the Binding request: 420 'Unknown Attribute'$",
    ):
        parse_binding_response(error, TID)
    with pytest.raises(StunError, match="refused the Binding request: no error code"):
        parse_binding_response(_response(b"", kind=0x0111), TID)
    bare = _response(_hex("00090004 00000400"), kind=0x0111)  # 400, no reason phrase
    with pytest.raises(StunError, match=r"refused the Binding request: 400$"):
        parse_binding_response(bare, TID)
    with pytest.raises(StunError, match="refused the Binding request: no valid error code"):
        parse_binding_response(_response(_hex("00090000"), kind=0x0111), TID)


def test_a_message_over_the_response_cap() -> None:
    header = struct.pack(">HHI", 0x0101, 4096, 0x2112A442) + TID
    with pytest.raises(StunError, match="4096 bytes of attributes, over 2048"):
        message_size(header)
    assert message_size(header, limit=4096) == 4096 + HEADER_SIZE
    with pytest.raises(ValueError, match="a STUN header is 20 bytes, not 19"):
        message_size(header[:19])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: binding_request(b"short"), "transaction id is 12 bytes"),
        (lambda: binding_success(b"x" * 13, "127.0.0.1", 1), "transaction id is 12 bytes"),
        (lambda: binding_success(TID, "127.0.0.1", 65536), "not a port: 65536"),
        (lambda: binding_success(TID, "127.0.0.1", -1), "not a port: -1"),
        (lambda: binding_success(TID, "broker.example", 1), "does not appear to be an IPv4"),
        (lambda: parse_binding_response(RFC5769_IPV4_RESPONSE, b""), "12 bytes"),
    ],
)
def test_local_mistakes_are_value_errors(call: object, message: str) -> None:
    assert callable(call)
    with pytest.raises(ValueError, match=message):
        call()
