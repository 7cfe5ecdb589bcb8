"""Finding 7 and its siblings: whatever a client sends, the broker answers with a clear status.

Before the fix a ReportProgress naming an undefined state (proto3 keeps any number) was an
INTERNAL with a 1.2 KB traceback in the log per call; an undefined candidate kind was stored
and handed to the other peer; a request whose bytes did not parse was an UNKNOWN with a
traceback. Here hypothesis builds every BrokerService request from the schema itself: every
field set or not, enums with any number, ints at their extremes, strings and bytes short,
long and odd, nested messages (Timestamps and Durations out of their range included), names
and tokens sometimes those of a real session so that calls get past authorization. Each call
must end OK or with a status that says what is wrong: never INTERNAL or UNKNOWN, no error
logged, and memory bounded. In volume against the broker in-process (the real servicer and
core, no sockets), then a smaller set, raw undecodable bytes included, against a real broker
process over gRPC on loopback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ferry.broker.config import BrokerConfig
from ferry.client.testing import InProcessBroker
from ferry.v1 import broker_pb2, broker_pb2_grpc
from tests.support.broker_flow import (
    RECEIVER_PAKE,
    auth,
    claim_confirmed_rpc,
    pake_sender,
)
from tests.support.processes import BrokerProcess

pytestmark = [pytest.mark.timeout(240)]

SERVICE = broker_pb2.DESCRIPTOR.services_by_name["BrokerService"]
#: Statuses that would mean the broker did not understand its own failure.
UNCLEAR = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
T = 5.0

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
#: The rate limits' flags, set out of the fuzz's way: it is after answers, not allowances.
_UNLIMITED = [
    *("--offer-burst-per-address", "1e9", "--offer-rate-per-address", "1e9"),
    *("--claim-burst-per-ip", "1e9", "--claim-rate-per-ip", "1e9"),
    *("--claim-burst-global", "1e9", "--claim-rate-global", "1e9"),
]
#: Stand-ins, replaced when a call is made, for the live session's name and its tokens.
SESSION, SENDER, RECEIVER = "@session", "@sender", "@receiver"
_ODD_TEXT = ["", ".", "..", "/", "a/../b", "\x00", "é", "sessions/", "7-orbit", "x" * 5000]


def _ints(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [low, high, 0, 1, -1, 65535, 65536, 1 << 20, 1 << 40]
    return st.one_of(
        st.sampled_from([e for e in edges if low <= e <= high]), st.integers(low, high)
    )


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in _INT_RANGES:
        return _ints(*_INT_RANGES[kind])
    if kind == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        return st.one_of(
            st.sampled_from([v.number for v in field.enum_type.values]),
            _ints(-(2**31), 2**31 - 1),
        )
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, width=32)
    if kind == FieldDescriptor.TYPE_STRING:
        if field.name == "name":  # often the live session's, so that calls get past it
            return st.one_of(st.just(SESSION), st.text(max_size=40), st.sampled_from(_ODD_TEXT))
        return st.one_of(st.text(max_size=40), st.sampled_from(_ODD_TEXT))
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.one_of(
            st.binary(max_size=80),
            st.sampled_from([b"", RECEIVER_PAKE, b"\x30\x82fake-der", b"x" * 20_000]),
        )
    raise AssertionError(f"no strategy for {field.full_name}")


@st.composite
def _message(draw: st.DrawFn, descriptor: Descriptor, depth: int = 0) -> Message:
    """A message of `descriptor`'s type: any subset of its fields, each with a drawn value."""
    cls = _classes()[descriptor.full_name]
    message: Message = cls()
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        repeated = field.is_repeated
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 3:
                continue
            assert field.message_type is not None
            child = _message(field.message_type, depth + 1)
            if repeated:
                count = draw(st.sampled_from([0, 1, 2, 3, 40]))
                values = [draw(child) for _ in range(min(count, 3))]
                getattr(message, field.name).extend(values * (count // max(len(values), 1)))
            else:
                getattr(message, field.name).CopyFrom(draw(child))
        elif repeated:
            getattr(message, field.name).extend(draw(st.lists(_scalar(field), max_size=4)))
        else:
            setattr(message, field.name, draw(_scalar(field)))
    return message


def _classes() -> dict[str, type[Message]]:
    """Message classes by full name: broker_pb2's and the well-known types it uses."""
    from google.protobuf import duration_pb2, timestamp_pb2

    out: dict[str, type[Message]] = {}
    for module in (broker_pb2, duration_pb2, timestamp_pb2):
        for name in module.DESCRIPTOR.message_types_by_name:
            cls = getattr(module, name)
            out[cls.DESCRIPTOR.full_name] = cls
            for nested in cls.DESCRIPTOR.nested_types:
                out[nested.full_name] = getattr(cls, nested.name)
    return out


def _calls() -> st.SearchStrategy[tuple[str, Message, str]]:
    """(method, request, token) for any BrokerService method."""
    return st.sampled_from(list(SERVICE.methods)).flatmap(
        lambda method: st.tuples(
            st.just(method.name),
            _message(method.input_type),
            st.sampled_from(["", "garbage", SENDER, RECEIVER]),
        )
    )


class _Live:
    """The session the generated calls aim at, made anew once a call ended it."""

    def __init__(self, stub: Any) -> None:
        self.stub = stub
        self.name = ""
        self.tokens: dict[str, str] = {}

    async def renew_if_ended(self) -> None:
        if self.name:
            request = broker_pb2.GetSessionRequest(name=self.name)
            try:
                response = await self.stub.GetSession(
                    request, metadata=auth(self.tokens[SENDER]), timeout=T
                )
            except grpc.aio.AioRpcError:
                pass
            else:
                if response.session.state < broker_pb2.Session.STATE_COMPLETED:  # still live
                    return
        self.name, sender, receiver = await _session(self.stub)
        self.tokens = {SENDER: sender, RECEIVER: receiver}

    async def call(self, method: str, request: Message, token: str) -> grpc.StatusCode:
        """Make the call with the stand-ins replaced; renew the session first if it ended."""
        await self.renew_if_ended()
        if getattr(request, "name", None) == SESSION:
            request.name = self.name  # type: ignore[attr-defined]
        return await _call(self.stub, method, request, self.tokens.get(token, token))


class _Errors(logging.Handler):
    """Collects the ERROR records the broker logs (an unexpected error, a traceback)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def broker_errors() -> Iterator[_Errors]:
    handler = _Errors()
    logger = logging.getLogger("ferry")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


async def _call(stub: Any, method: str, request: Message, token: str) -> grpc.StatusCode:
    """Make one call; its status code (OK for an answer, or a stream's first message)."""
    metadata = auth(token) if token else None
    try:
        if method in ("WatchSession", "WatchInbox"):
            call = getattr(stub, method)(request, metadata=metadata, timeout=T)
            try:
                async for _ in call:
                    break
            finally:
                call.cancel()
        else:
            await getattr(stub, method)(request, metadata=metadata, timeout=T)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def _session(stub: Any) -> tuple[str, str, str]:
    """A real offer, claimed and confirmed: its name, the sender's and receiver's tokens."""
    request = broker_pb2.CreateOfferRequest(
        manifest=broker_pb2.Manifest(
            files=[broker_pb2.FileEntry(path="a.bin", size_bytes=5)], chunk_size_bytes=1 << 20
        ),
        sender=pake_sender(
            broker_pb2.PeerInfo(
                allowed_ports=broker_pb2.PortRange(first_port=42000, last_port=42100),
                certificate_der=b"\x30\x82fake-der",
            )
        ),
    )
    offer = await stub.CreateOffer(request, timeout=T)
    claim = await claim_confirmed_rpc(stub, offer)
    return offer.session.name, offer.party_token, claim.party_token


def _report(state: int) -> Message:
    return broker_pb2.ReportProgressRequest(name=SESSION, state=state)  # type: ignore[arg-type]


async def _channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address)


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


def test_generated_requests_in_process_get_clear_answers(broker_errors: _Errors) -> None:
    """In volume: 1,500 generated calls against the real servicer and core in this process."""
    loop = asyncio.new_event_loop()
    # Rate limits out of the way: the fuzz is after answers, not allowances.
    config = BrokerConfig(
        offer_burst_per_address=1e9,
        offer_refill_per_address_s=1e9,
        claim_burst_per_ip=1e9,
        claim_refill_per_ip_s=1e9,
        claim_burst_global=1e9,
        claim_refill_global_s=1e9,
    )
    broker = InProcessBroker(config)
    seen: dict[str, set[grpc.StatusCode]] = {}
    try:
        loop.run_until_complete(broker.__aenter__())
        link = broker()
        live = _Live(link._stub)  # the generated stub over the in-process channel
        loop.run_until_complete(live.renew_if_ended())
        base = _rss()

        @settings(
            max_examples=1500,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(call=_calls())
        @example(call=("ReportProgress", _report(99), SENDER))  # finding 7 as reported
        @example(call=("ReportProgress", _report(-5), RECEIVER))
        def one(call: tuple[str, Message, str]) -> None:
            method, request, token = call
            code = loop.run_until_complete(live.call(method, request, token))
            seen.setdefault(method, set()).add(code)
            assert code not in UNCLEAR, (method, request, code)

        one()
        grown = _rss() - base
    finally:
        loop.run_until_complete(broker.aclose())
        loop.close()
    summary = {m: sorted(c.name for c in codes) for m, codes in seen.items()}
    print(f"in-process fuzz: RSS +{grown >> 20} MiB; statuses {summary}")
    assert not broker_errors.records, [r.getMessage() for r in broker_errors.records[:3]]
    assert grown < 64 << 20
    assert len(seen) == len(SERVICE.methods)  # every method was called


def test_generated_and_undecodable_requests_over_grpc_get_clear_answers(tmp_path: Path) -> None:
    """Over the wire: 300 generated calls and 100 undecodable bodies to a broker process."""
    broker = BrokerProcess(
        data_dir=tmp_path / "data",
        args=["--log-level", "WARNING", *_UNLIMITED],
    )
    broker.start()
    loop = asyncio.new_event_loop()
    try:
        assert broker.proc is not None
        proc = psutil.Process(broker.proc.pid)
        channel = loop.run_until_complete(_channel(broker.address))  # bound to this loop
        stub = broker_pb2_grpc.BrokerServiceStub(channel)
        live = _Live(stub)
        loop.run_until_complete(live.renew_if_ended())
        base, base_fds = proc.memory_info().rss, proc.num_fds()

        @settings(
            max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(call=_calls())
        def generated(call: tuple[str, Message, str]) -> None:
            method, request, token = call
            code = loop.run_until_complete(live.call(method, request, token))
            assert code not in UNCLEAR, (method, request, code)

        @settings(
            max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(
            method=st.sampled_from([m for m in SERVICE.methods if not m.server_streaming]),
            body=st.binary(min_size=1, max_size=64),
        )
        def undecodable(method: Any, body: bytes) -> None:
            call: Any = channel.unary_unary(f"/{SERVICE.full_name}/{method.name}")

            async def go() -> grpc.StatusCode:
                try:
                    await call(body, timeout=T)
                except grpc.aio.AioRpcError as error:
                    return error.code()
                return grpc.StatusCode.OK

            code = loop.run_until_complete(go())
            assert code not in UNCLEAR, (method.name, body, code)

        generated()
        undecodable()
        grown, fds = proc.memory_info().rss - base, proc.num_fds()
        loop.run_until_complete(channel.close())
    finally:
        loop.close()
        broker.kill()
    log = "".join(path.read_text() for path in broker.log)
    print(f"gRPC fuzz: broker RSS +{grown >> 20} MiB, fds {base_fds} -> {fds}")
    assert "Traceback" not in log, log[-2000:]
    assert "ERROR" not in log, log[-2000:]
    assert grown < 64 << 20
    assert fds - base_fds < 16


def test_undefined_enum_values_are_invalid_arguments(tmp_path: Path) -> None:
    """Finding 7 itself, and its sibling in PeerInfo: each is INVALID_ARGUMENT, logged nowhere."""
    broker = BrokerProcess(data_dir=tmp_path / "data", args=["--log-level", "INFO"])
    broker.start()
    loop = asyncio.new_event_loop()

    async def go() -> list[tuple[str, str]]:
        channel = await _channel(broker.address)
        live = _Live(broker_pb2_grpc.BrokerServiceStub(channel))
        await live.renew_if_ended()
        peer = broker_pb2.PeerInfo(
            candidates=[broker_pb2.Candidate(ip="127.0.0.2", kind=77)],  # type: ignore[arg-type]
            allowed_ports=broker_pb2.PortRange(first_port=42000, last_port=42100),
            certificate_der=b"\x30\x82fake-der",
        )
        calls = [
            ("ReportProgress", _report(99), SENDER),
            ("ReportProgress", _report(-1), RECEIVER),
            ("ResumeSession", broker_pb2.ResumeSessionRequest(name=SESSION, peer=peer), SENDER),
            ("AcceptOffer", broker_pb2.AcceptOfferRequest(name=SESSION, receiver=peer), RECEIVER),
        ]
        out = [(method, (await live.call(method, r, token)).name) for method, r, token in calls]
        await channel.close()
        return out

    try:
        outcomes = loop.run_until_complete(go())
    finally:
        loop.close()
        broker.kill()
    assert outcomes == [
        ("ReportProgress", "INVALID_ARGUMENT"),
        ("ReportProgress", "INVALID_ARGUMENT"),
        ("ResumeSession", "INVALID_ARGUMENT"),
        ("AcceptOffer", "INVALID_ARGUMENT"),
    ]
    log = "".join(path.read_text() for path in broker.log)
    assert "Traceback" not in log, log[-2000:]
