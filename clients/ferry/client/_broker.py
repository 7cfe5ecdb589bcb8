"""The client's adapter to the broker: the ferry.v1 stub with deadlines, auth and errors.

Every call has a deadline. Calls after CreateOffer/ClaimOffer carry the party token as
`authorization: Bearer ...` metadata. Failures become `BrokerError` with the gRPC status
code and the broker's machine-readable reason (google.rpc.ErrorInfo).

A broker that is restarting, moving or overloaded is not an answer: a call that finds it
unreachable (UNAVAILABLE) or too slow (DEADLINE_EXCEEDED) is tried again, backing off from
0.2 s to 5 s between tries, for up to ``patience`` seconds in all (default 300, the CLI's
``--broker-wait``); ``on_wait`` hears about it once per call that has to wait. Every call is
safe to repeat: offers and claims carry a request id, completion and progress reports are
idempotent, and the callers of accept, decline and cancel recognize their own earlier
success (`BrokerError.retried`). Only progress reports fail fast: the next one follows soon.

A link opens its own gRPC channel to ``address``, or is handed one (``channel=``): that is
how `ferry.client.testing` puts a whole broker inside the process, and a `Client` gets its
links from a `LinkFactory` (by default, one that dials its address).

The address says whether the channel is TLS (`_channel`: ``grpcs://``, ``grpc://``, or bare
``host:port``, TLS unless loopback; ``tls=`` gives the CA and client certificate). A TLS
failure is not waited for like a broker that is down: when a call finds the broker
unavailable, `_tlsprobe` tells why, and a certificate problem (untrusted, expired, another
host's, ours refused, no TLS at all) raises `BrokerTLSError` at once.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol, TypeVar

import grpc
import grpc.aio
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ferry.client._channel import ChannelTLS, open_channel, parse_broker_address
from ferry.errors import FerryError
from ferry.files.display import shown
from ferry.v1 import broker_pb2, broker_pb2_grpc

__all__ = ["BrokerError", "BrokerLink", "BrokerTLSError", "LinkFactory"]

DEFAULT_TIMEOUT = 10.0
#: How long a call keeps trying a broker that does not answer, in all.
DEFAULT_PATIENCE = 300.0
COMPLETE_TIMEOUT = 120.0
_FIRST_PAUSE = 0.2
_LONGEST_PAUSE = 5.0
#: How long a call refused as RATE_LIMITED is tried again, in all (issue 10, finding 3).
RATE_LIMIT_RETRY_S = 60.0
_SLOW_FIRST_PAUSE = 1.0
_SLOW_LONGEST_PAUSE = 8.0
#: How much of a refusal's text (the broker's, or gRPC's) an error message quotes.
_DETAILS_CHARS = 1000
#: Codes that say nothing about the call itself: the broker was not there, or not in time.
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_Response = TypeVar("_Response")


class BrokerError(FerryError):
    """The broker refused a call, or could not be reached.

    ``retried``: the call was sent more than once (an earlier try may have taken effect
    without its answer arriving).
    """

    def __init__(
        self, code: grpc.StatusCode, message: str, reason: str = "", *, retried: bool = False
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.retried = retried

    @property
    def unreachable(self) -> bool:
        """Whether the broker did not answer at all (down, moved, or too slow)."""
        return self.code in TRANSIENT and not self.reason

    def __str__(self) -> str:
        return str(self.args[0])

    @classmethod
    def from_rpc(
        cls, err: grpc.aio.AioRpcError, what: str, *, retried: bool = False
    ) -> BrokerError:
        """Translate a failed call, keeping its ErrorInfo reason."""
        reason = ""
        status = rpc_status.from_call(err)
        if status is not None:
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    reason = info.reason
        code = err.code()
        # The broker's words are untrusted like a peer's: escaped and cut before they are shown.
        details = shown(err.details() or "", _DETAILS_CHARS)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and not reason:
            return cls(
                code,
                f"{what}: the broker cannot be reached ({details})",
                reason,
                retried=retried,
            )
        return cls(code, f"{what}: {details}", reason, retried=retried)


class BrokerTLSError(BrokerError):
    """The broker was reached, but not securely: its certificate is not trusted, has
    expired or names another host, it refused this client's certificate, or one side does
    not speak TLS. Waiting does not fix that; the message says what to change.

    ``kind`` says which (``untrusted``, ``expired``, ``not_yet_valid``, ``wrong_host``,
    ``client_certificate``, ``not_tls``, ``expects_tls``, ``handshake``); ``verify_code`` is
    OpenSSL's when the broker's certificate was refused.
    """

    def __init__(self, message: str, kind: str, verify_code: int | None = None) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, message)
        self.kind = kind
        self.verify_code = verify_code

    @property
    def unreachable(self) -> bool:
        """False: the broker answered, just not with a connection this client can trust."""
        return False


class BrokerLink:
    """One channel to the broker, and the party token once the client has one."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        patience: float = DEFAULT_PATIENCE,
        on_wait: Callable[[BrokerError], None] | None = None,
        channel: grpc.aio.Channel | None = None,
        tls: ChannelTLS | None = None,
    ) -> None:
        """``channel``: talk over this one (closed with the link) instead of dialing
        ``address``, which then only names the broker. ``tls``: the CA, client certificate
        and plaintext permission for the channel this link dials (BrokerSettingsError if
        they, or the address, cannot be used)."""
        self.address = address
        self.timeout = timeout
        self.patience = patience
        self.on_wait = on_wait
        self._tls = tls if tls is not None else ChannelTLS()
        self._target = None
        if channel is None:
            insecure = self._tls.insecure_plaintext
            self._target = parse_broker_address(address, insecure_plaintext=insecure)
            channel = open_channel(self._target, self._tls)
        self._channel = channel
        self._stub = broker_pb2_grpc.BrokerServiceStub(self._channel)
        self.token = ""
        self._reflexive: str | None = None  # GetBrokerInfo's reflexive_address, once asked

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    def _meta(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    async def _call(
        self,
        rpc: Callable[..., Awaitable[_Response]],
        request: object,
        what: str,
        *,
        patient: bool = True,
        deadline: float | None = None,
    ) -> _Response:
        """One unary call: deadline, auth metadata, and failures as BrokerError.

        ``patient`` calls try again while the broker is unreachable or too slow, up to
        ``patience`` seconds in all: the first try fails fast on a broker that is down (so
        that ``on_wait`` can say so at once), later ones wait for it to come back within
        their deadline. The others make one fail-fast try.

        A patient call the broker refuses as RATE_LIMITED (too many calls, or failed claims,
        from this address: someone behind the same NAT may be flooding or guessing) waits
        too, 1 s then doubling to 8 s with jitter (so that neighbours do not retry in step),
        for up to RATE_LIMIT_RETRY_S (never past ``patience``). Safe to repeat: the broker
        refuses such a call before it does anything.
        """
        give_up = time.monotonic() + (self.patience if patient else 0.0)
        slowed_until = time.monotonic() + (min(self.patience, RATE_LIMIT_RETRY_S) if patient else 0)
        pause = _FIRST_PAUSE
        slow_pause = _SLOW_FIRST_PAUSE
        tries = 0
        while True:
            tries += 1
            timeout = deadline or self.timeout
            if tries > 1:
                timeout = min(timeout, max(give_up - time.monotonic(), 1.0))
            try:
                return await rpc(
                    request,
                    timeout=timeout,
                    metadata=self._meta(),
                    wait_for_ready=patient and tries > 1,
                )
            except grpc.aio.AioRpcError as err:
                error = BrokerError.from_rpc(err, what, retried=tries > 1)
                if error.reason == "RATE_LIMITED":
                    if time.monotonic() + slow_pause > slowed_until:
                        raise error from None
                    if slow_pause == _SLOW_FIRST_PAUSE and self.on_wait is not None:
                        self.on_wait(error)  # once: the CLI says why it waits
                    await asyncio.sleep(slow_pause * (0.5 + random.random() / 2))
                    slow_pause = min(slow_pause * 2, _SLOW_LONGEST_PAUSE)
                    continue
                if error.code in TRANSIENT:
                    await self._raise_tls_problem()
                if error.code not in TRANSIENT or time.monotonic() + pause > give_up:
                    raise error from None
            if tries == 1 and self.on_wait is not None:
                self.on_wait(error)
            await asyncio.sleep(pause)
            pause = min(pause * 2, _LONGEST_PAUSE)

    async def _raise_tls_problem(self) -> None:
        """BrokerTLSError if the broker is unavailable for a reason of TLS (see _tlsprobe)."""
        if self._target is None:
            return  # a channel handed in: nothing to probe
        from ferry.client._tlsprobe import diagnose  # only after a failure: off the start-up

        problem = await diagnose(self._target, self._tls, min(self.timeout, 3.0))
        if problem is not None:
            raise BrokerTLSError(problem.message, problem.kind, problem.verify_code) from None

    async def broker_id(self) -> str:
        """GetBrokerInfo: the broker's stable id (the same at any address, new if its state
        was lost)."""
        request = broker_pb2.GetBrokerInfoRequest()
        response = await self._call(self._stub.GetBrokerInfo, request, "broker info")
        return response.broker_id

    async def reflexive_target(self) -> tuple[str, int] | None:
        """Where the broker's reflexive responder listens (GetBrokerInfo): ``(host, port)``,
        the broker's own host where it names none; None if it has none (or the host is not
        known, for a link handed a channel)."""
        if self._reflexive is None:
            request = broker_pb2.GetBrokerInfoRequest()
            response = await self._call(self._stub.GetBrokerInfo, request, "broker info")
            self._reflexive = response.reflexive_address
        host, _, port_text = self._reflexive.rpartition(":")
        host = host.strip("[]")
        if not host and self._target is not None:
            host = self._target.host
        try:
            port = int(port_text)
        except ValueError:
            return None
        if not host or not 1 <= port <= 65535:
            return None
        return host, port

    async def create_offer(
        self, request: broker_pb2.CreateOfferRequest
    ) -> broker_pb2.CreateOfferResponse:
        """CreateOffer; keeps the sender's token."""
        response = await self._call(self._stub.CreateOffer, request, "offer")
        self.token = response.party_token
        return response

    async def claim_offer(
        self,
        nameplate: str,
        request_id: str = "",
        *,
        pake_message: bytes = b"",
        claim_verifier: bytes = b"",
    ) -> broker_pb2.ClaimOfferResponse:
        """ClaimOffer of a code's nameplate (never its password); keeps the receiver's token."""
        request = broker_pb2.ClaimOfferRequest(
            code=nameplate,
            request_id=request_id,
            pake_message=pake_message,
            claim_verifier=claim_verifier,
        )
        response = await self._call(self._stub.ClaimOffer, request, "code")
        self.token = response.party_token
        return response

    async def confirm_key(
        self, name: str, key_confirmation: bytes, certificate_mac: bytes = b""
    ) -> broker_pb2.Session:
        """ConfirmKey: this side's proof of the PAKE key (and the sender's certificate MAC)."""
        request = broker_pb2.ConfirmKeyRequest(
            name=name, key_confirmation=key_confirmation, certificate_mac=certificate_mac
        )
        return (await self._call(self._stub.ConfirmKey, request, "confirm key")).session

    async def accept(self, name: str, me: broker_pb2.PeerInfo) -> broker_pb2.Session:
        """AcceptOffer."""
        request = broker_pb2.AcceptOfferRequest(name=name, receiver=me)
        return (await self._call(self._stub.AcceptOffer, request, "accept")).session

    async def decline(self, name: str, reason: str) -> broker_pb2.Session:
        """DeclineOffer."""
        request = broker_pb2.DeclineOfferRequest(name=name, reason=reason)
        return (await self._call(self._stub.DeclineOffer, request, "decline")).session

    async def cancel(self, name: str, reason: str) -> broker_pb2.Session:
        """CancelSession."""
        request = broker_pb2.CancelSessionRequest(name=name, reason=reason)
        return (await self._call(self._stub.CancelSession, request, "cancel")).session

    async def get(self, name: str) -> broker_pb2.Session:
        """GetSession."""
        request = broker_pb2.GetSessionRequest(name=name)
        return (await self._call(self._stub.GetSession, request, "status")).session

    async def report(
        self,
        name: str,
        state: int,
        bytes_done: int,
        failure_reason: str = "",
        path: broker_pb2.PathReport | None = None,
        *,
        bytes_direct: int = 0,
        bytes_store: int = 0,
        file_digests: Sequence[bytes] = (),
    ) -> broker_pb2.Session:
        """ReportProgress. Only a completion waits for a restarting broker (it must arrive);
        any other report makes one try (progress is reported again soon, a failure is best
        effort). ``path``: how the peers connected (the receiver's); ``bytes_direct`` and
        ``bytes_store``: what each path carried of this run's bytes (a completion's);
        ``file_digests``: each file's verified digest (a completion's, for the audit log)."""
        request = broker_pb2.ReportProgressRequest(
            name=name,
            state=state,  # type: ignore[arg-type]
            bytes_done=bytes_done,
            failure_reason=failure_reason[:1000],
            path=path,
            bytes_direct=bytes_direct,
            bytes_store=bytes_store,
            file_digests=file_digests,
        )
        patient = state == broker_pb2.Session.STATE_COMPLETED
        call = self._stub.ReportProgress
        return (await self._call(call, request, "report", patient=patient)).session

    async def report_failed(self, name: str, reason: str) -> bool:
        """Tell the broker this side failed, best effort (one try): the failure being reported
        already says what went wrong, and the broker may be the part that is gone. True if
        the session is now over on the broker (failed by this report, or final already)."""
        try:
            await self.report(name, broker_pb2.Session.STATE_FAILED, 0, reason)  # one try
        except BrokerError as exc:
            # Refused as illegal: the session is final already (nothing else refuses FAILED).
            return exc.reason == "ILLEGAL_TRANSITION"
        return True

    async def resume(self, name: str, me: broker_pb2.PeerInfo) -> broker_pb2.Session:
        """ResumeSession: come back with new connection details; a new attempt."""
        request = broker_pb2.ResumeSessionRequest(name=name, peer=me)
        return (await self._call(self._stub.ResumeSession, request, "resume")).session

    async def publish_candidates(
        self, name: str, attempt: int, candidates: Sequence[broker_pb2.Candidate]
    ) -> broker_pb2.Session:
        """PublishCandidates: where this side can be reached on ``attempt``."""
        request = broker_pb2.PublishCandidatesRequest(
            name=name, attempt=attempt, candidates=candidates
        )
        return (await self._call(self._stub.PublishCandidates, request, "candidates")).session

    async def watch(self, name: str, seconds: float) -> AsyncIterator[broker_pb2.Session]:
        """WatchSession: the session now, then after every change, for at most ``seconds``."""
        call = self._stub.WatchSession(
            broker_pb2.WatchSessionRequest(name=name), timeout=seconds, metadata=self._meta()
        )
        try:
            async for response in call:
                yield response.session
        except grpc.aio.AioRpcError as err:
            raise BrokerError.from_rpc(err, "watch") from None
        finally:
            call.cancel()

    # -- people (issue 13): sign-in needs no token, the rest the device's access token ----

    async def enroll_device(
        self, request: broker_pb2.EnrollDeviceRequest
    ) -> broker_pb2.EnrollDeviceResponse:
        """EnrollDevice (no token: the enrollment token is the credential). A retry after a
        lost answer finds the token used up (ENROLLMENT_INVALID with ``retried``)."""
        return await self._call(self._stub.EnrollDevice, request, "enroll")

    async def create_challenge(self, device_id: str) -> broker_pb2.CreateChallengeResponse:
        """CreateChallenge: a fresh challenge for this device to sign."""
        request = broker_pb2.CreateChallengeRequest(device_id=device_id)
        return await self._call(self._stub.CreateChallenge, request, "sign in")

    async def sign_in(self, request: broker_pb2.SignInRequest) -> broker_pb2.SignInResponse:
        """SignIn; keeps the access token for the calls that follow on this link."""
        response = await self._call(self._stub.SignIn, request, "sign in")
        self.token = response.access_token
        return response

    async def list_peers(self, user: str = "") -> list[broker_pb2.Peer]:
        """ListPeers (access token): every peer, or only ``user``."""
        request = broker_pb2.ListPeersRequest(user=user)
        return list((await self._call(self._stub.ListPeers, request, "peers")).peers)

    async def list_inbox(self) -> list[broker_pb2.Session]:
        """ListInbox (access token): the offers waiting for this device's user."""
        request = broker_pb2.ListInboxRequest()
        return list((await self._call(self._stub.ListInbox, request, "inbox")).offers)

    async def watch_inbox(self, seconds: float) -> AsyncIterator[broker_pb2.WatchInboxResponse]:
        """WatchInbox (access token): the inbox now, then after every change, for at most
        ``seconds``; this device is online meanwhile."""
        call = self._stub.WatchInbox(
            broker_pb2.WatchInboxRequest(), timeout=seconds, metadata=self._meta()
        )
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as err:
            raise BrokerError.from_rpc(err, "inbox") from None
        finally:
            call.cancel()

    async def take_offer(self, name: str) -> broker_pb2.TakeOfferResponse:
        """TakeOffer (access token); keeps the receiver's party token. Safe to repeat: the
        same device gets the same token."""
        request = broker_pb2.TakeOfferRequest(name=name)
        response = await self._call(self._stub.TakeOffer, request, "take offer")
        self.token = response.party_token
        return response

    # -- object-store fallback (the URLs returned are bearer secrets: never log them) -----

    async def start_store_upload(
        self, name: str, file_index: int
    ) -> broker_pb2.StartStoreUploadResponse:
        """StartStoreUpload (sender)."""
        request = broker_pb2.StartStoreUploadRequest(name=name, file_index=file_index)
        return await self._call(self._stub.StartStoreUpload, request, "store upload")

    async def presign_store_parts(
        self, name: str, file_index: int, part_numbers: list[int], include_digests: bool
    ) -> broker_pb2.PresignStorePartsResponse:
        """PresignStoreParts (sender)."""
        request = broker_pb2.PresignStorePartsRequest(
            name=name,
            file_index=file_index,
            part_numbers=part_numbers,
            include_digests=include_digests,
        )
        return await self._call(self._stub.PresignStoreParts, request, "store upload")

    async def list_store_parts(
        self, name: str, file_index: int
    ) -> broker_pb2.ListStorePartsResponse:
        """ListStoreParts (sender)."""
        request = broker_pb2.ListStorePartsRequest(name=name, file_index=file_index)
        return await self._call(self._stub.ListStoreParts, request, "store upload")

    async def complete_store_upload(
        self, name: str, file_index: int, parts: Sequence[broker_pb2.StoredPart] = ()
    ) -> broker_pb2.CompleteStoreUploadResponse:
        """CompleteStoreUpload (sender), with the parts as this sender uploaded them."""
        request = broker_pb2.CompleteStoreUploadRequest(
            name=name, file_index=file_index, parts=parts
        )
        # The broker lists and joins every part in this one call: S3 may take a while.
        return await self._call(
            self._stub.CompleteStoreUpload,
            request,
            "store upload",
            deadline=max(self.timeout, COMPLETE_TIMEOUT),
        )

    async def presign_store_download(
        self, name: str, file_index: int
    ) -> broker_pb2.PresignStoreDownloadResponse:
        """PresignStoreDownload (receiver)."""
        request = broker_pb2.PresignStoreDownloadRequest(name=name, file_index=file_index)
        return await self._call(self._stub.PresignStoreDownload, request, "store download")


class LinkFactory(Protocol):
    """Where a `Client` gets its links: a new `BrokerLink` for each use (an offer, a claim,
    a look-up), with the client's deadline and patience. A string address makes one that
    dials it; `ferry.client.testing.InProcessBroker` is one too. An ``address`` attribute,
    if the factory has one, names the broker in messages."""

    def __call__(
        self,
        *,
        timeout: float,
        patience: float,
        on_wait: Callable[[BrokerError], None] | None,
    ) -> BrokerLink:
        """A new link, not shared with anyone: whoever gets it closes it."""
        ...
