"""The client's adapter to the broker: the ferry.v1 stub with deadlines, auth and errors.

Every call has a deadline. Calls after CreateOffer/ClaimOffer carry the party token as
`authorization: Bearer ...` metadata. Failures become `BrokerError` with the gRPC status
code and the broker's machine-readable reason (google.rpc.ErrorInfo).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

import grpc
import grpc.aio
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ferry.v1 import broker_pb2, broker_pb2_grpc

__all__ = ["BrokerError", "BrokerLink"]

DEFAULT_TIMEOUT = 10.0
COMPLETE_TIMEOUT = 120.0
_Response = TypeVar("_Response")


class BrokerError(Exception):
    """The broker refused a call, or could not be reached."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return str(self.args[0])

    @classmethod
    def from_rpc(cls, err: grpc.aio.AioRpcError, what: str) -> BrokerError:
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
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and not reason:
            return cls(code, f"{what}: the broker cannot be reached ({err.details()})", reason)
        return cls(code, f"{what}: {err.details()}", reason)


class BrokerLink:
    """One channel to the broker, and the party token once the client has one."""

    def __init__(self, address: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = grpc.aio.insecure_channel(
            address,
            options=[
                ("grpc.enable_retries", 1),
                ("grpc.keepalive_time_ms", 30_000),
                # Come back quickly after a broker restart (the default backoff grows to 2 min).
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 2_000),
            ],
        )
        self._stub = broker_pb2_grpc.BrokerServiceStub(self._channel)
        self.token = ""

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
        ready: bool = False,
        deadline: float | None = None,
    ) -> _Response:
        """One unary call: deadline, auth metadata, and failures as BrokerError.

        ``ready`` waits (within the deadline) for a broker that is restarting before sending;
        nothing is ever sent twice. Only progress reports, which are best effort and frequent,
        fail fast instead.
        """
        try:
            return await rpc(
                request,
                timeout=deadline or self.timeout,
                metadata=self._meta(),
                wait_for_ready=ready,
            )
        except grpc.aio.AioRpcError as err:
            raise BrokerError.from_rpc(err, what) from None

    async def create_offer(
        self, request: broker_pb2.CreateOfferRequest
    ) -> broker_pb2.CreateOfferResponse:
        """CreateOffer; keeps the sender's token."""
        response = await self._call(self._stub.CreateOffer, request, "offer", ready=True)
        self.token = response.party_token
        return response

    async def claim_offer(self, code: str, request_id: str = "") -> broker_pb2.ClaimOfferResponse:
        """ClaimOffer; keeps the receiver's token."""
        request = broker_pb2.ClaimOfferRequest(code=code, request_id=request_id)
        response = await self._call(self._stub.ClaimOffer, request, "code", ready=True)
        self.token = response.party_token
        return response

    async def accept(self, name: str, me: broker_pb2.PeerInfo) -> broker_pb2.Session:
        """AcceptOffer."""
        request = broker_pb2.AcceptOfferRequest(name=name, receiver=me)
        return (await self._call(self._stub.AcceptOffer, request, "accept", ready=True)).session

    async def decline(self, name: str, reason: str) -> broker_pb2.Session:
        """DeclineOffer."""
        request = broker_pb2.DeclineOfferRequest(name=name, reason=reason)
        return (await self._call(self._stub.DeclineOffer, request, "decline", ready=True)).session

    async def cancel(self, name: str, reason: str) -> broker_pb2.Session:
        """CancelSession."""
        request = broker_pb2.CancelSessionRequest(name=name, reason=reason)
        return (await self._call(self._stub.CancelSession, request, "cancel", ready=True)).session

    async def get(self, name: str) -> broker_pb2.Session:
        """GetSession."""
        request = broker_pb2.GetSessionRequest(name=name)
        return (await self._call(self._stub.GetSession, request, "status", ready=True)).session

    async def report(
        self, name: str, state: int, bytes_done: int, failure_reason: str = ""
    ) -> broker_pb2.Session:
        """ReportProgress."""
        request = broker_pb2.ReportProgressRequest(
            name=name,
            state=state,  # type: ignore[arg-type]
            bytes_done=bytes_done,
            failure_reason=failure_reason[:1000],
        )
        return (await self._call(self._stub.ReportProgress, request, "report")).session

    async def report_failed(self, name: str, reason: str) -> None:
        """Tell the broker this side failed, best effort: the failure being reported already
        says what went wrong, and the broker may be the part that is gone."""
        with contextlib.suppress(BrokerError):
            await self.report(name, broker_pb2.Session.STATE_FAILED, 0, reason)

    async def resume(self, name: str, me: broker_pb2.PeerInfo) -> broker_pb2.Session:
        """ResumeSession: come back with new connection details; a new attempt."""
        request = broker_pb2.ResumeSessionRequest(name=name, peer=me)
        return (await self._call(self._stub.ResumeSession, request, "resume", ready=True)).session

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

    # -- object-store fallback (the URLs returned are bearer secrets: never log them) -----

    async def start_store_upload(
        self, name: str, file_index: int
    ) -> broker_pb2.StartStoreUploadResponse:
        """StartStoreUpload (sender)."""
        request = broker_pb2.StartStoreUploadRequest(name=name, file_index=file_index)
        return await self._call(self._stub.StartStoreUpload, request, "store upload", ready=True)

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
        return await self._call(self._stub.PresignStoreParts, request, "store upload", ready=True)

    async def list_store_parts(
        self, name: str, file_index: int
    ) -> broker_pb2.ListStorePartsResponse:
        """ListStoreParts (sender)."""
        request = broker_pb2.ListStorePartsRequest(name=name, file_index=file_index)
        return await self._call(self._stub.ListStoreParts, request, "store upload", ready=True)

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
            ready=True,
            deadline=max(self.timeout, COMPLETE_TIMEOUT),
        )

    async def presign_store_download(
        self, name: str, file_index: int
    ) -> broker_pb2.PresignStoreDownloadResponse:
        """PresignStoreDownload (receiver)."""
        request = broker_pb2.PresignStoreDownloadRequest(name=name, file_index=file_index)
        return await self._call(
            self._stub.PresignStoreDownload, request, "store download", ready=True
        )
