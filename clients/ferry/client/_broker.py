"""The client's adapter to the broker: the ferry.v1 stub with deadlines, auth and errors.

Every call has a deadline. Calls after CreateOffer/ClaimOffer carry the party token as
`authorization: Bearer ...` metadata. Failures become `BrokerError` with the gRPC status
code and the broker's machine-readable reason (google.rpc.ErrorInfo).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import grpc.aio
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ferry.v1 import broker_pb2, broker_pb2_grpc

__all__ = ["BrokerError", "BrokerLink"]

DEFAULT_TIMEOUT = 10.0


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

    async def create_offer(
        self, request: broker_pb2.CreateOfferRequest
    ) -> broker_pb2.CreateOfferResponse:
        """CreateOffer; keeps the sender's token."""
        try:
            response: broker_pb2.CreateOfferResponse = await self._stub.CreateOffer(
                request, timeout=self.timeout, wait_for_ready=True
            )
        except grpc.aio.AioRpcError as err:
            raise BrokerError.from_rpc(err, "offer") from None
        self.token = response.party_token
        return response

    async def claim_offer(self, code: str, request_id: str = "") -> broker_pb2.ClaimOfferResponse:
        """ClaimOffer; keeps the receiver's token."""
        try:
            response: broker_pb2.ClaimOfferResponse = await self._stub.ClaimOffer(
                broker_pb2.ClaimOfferRequest(code=code, request_id=request_id),
                timeout=self.timeout,
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError as err:
            raise BrokerError.from_rpc(err, "code") from None
        self.token = response.party_token
        return response

    async def accept(self, name: str, me: broker_pb2.PeerInfo) -> broker_pb2.Session:
        """AcceptOffer."""
        try:
            response: broker_pb2.AcceptOfferResponse = await self._stub.AcceptOffer(
                broker_pb2.AcceptOfferRequest(name=name, receiver=me),
                timeout=self.timeout,
                metadata=self._meta(),
            )
        except grpc.aio.AioRpcError as err:
            raise BrokerError.from_rpc(err, "accept") from None
        return response.session

    async def decline(self, name: str, reason: str) -> broker_pb2.Session:
        """DeclineOffer."""
        try:
            response: broker_pb2.DeclineOfferResponse = await self._stub.DeclineOffer(
                broker_pb2.DeclineOfferRequest(name=name, reason=reason),
                timeout=self.timeout,
                metadata=self._meta(),
            )
        except grpc.aio.AioRpcError as err:
            raise BrokerError.from_rpc(err, "decline") from None
        return response.session

    async def cancel(self, name: str, reason: str) -> broker_pb2.Session:
        """CancelSession."""
        try:
            response: broker_pb2.CancelSessionResponse = await self._stub.CancelSession(
                broker_pb2.CancelSessionRequest(name=name, reason=reason),
                timeout=self.timeout,
                metadata=self._meta(),
            )
        except grpc.aio.AioRpcError as err:
            raise BrokerError.from_rpc(err, "cancel") from None
        return response.session

    async def get(self, name: str) -> broker_pb2.Session:
        """GetSession."""
        try:
            response: broker_pb2.GetSessionResponse = await self._stub.GetSession(
                broker_pb2.GetSessionRequest(name=name),
                timeout=self.timeout,
                metadata=self._meta(),
            )
        except grpc.aio.AioRpcError as err:
            raise BrokerError.from_rpc(err, "status") from None
        return response.session

    async def report(
        self, name: str, state: int, bytes_done: int, failure_reason: str = ""
    ) -> broker_pb2.Session:
        """ReportProgress."""
        try:
            response: broker_pb2.ReportProgressResponse = await self._stub.ReportProgress(
                broker_pb2.ReportProgressRequest(
                    name=name,
                    state=state,  # type: ignore[arg-type]
                    bytes_done=bytes_done,
                    failure_reason=failure_reason[:1000],
                ),
                timeout=self.timeout,
                metadata=self._meta(),
            )
        except grpc.aio.AioRpcError as err:
            raise BrokerError.from_rpc(err, "report") from None
        return response.session

    async def resume(self, name: str, me: broker_pb2.PeerInfo) -> broker_pb2.Session:
        """ResumeSession: come back with new connection details; a new attempt."""
        try:
            response: broker_pb2.ResumeSessionResponse = await self._stub.ResumeSession(
                broker_pb2.ResumeSessionRequest(name=name, peer=me),
                timeout=self.timeout,
                metadata=self._meta(),
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError as err:
            raise BrokerError.from_rpc(err, "resume") from None
        return response.session

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
        try:
            response: broker_pb2.StartStoreUploadResponse = await self._stub.StartStoreUpload(
                broker_pb2.StartStoreUploadRequest(name=name, file_index=file_index),
                timeout=self.timeout,
                metadata=self._meta(),
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError as err:
            raise BrokerError.from_rpc(err, "store upload") from None
        return response

    async def presign_store_parts(
        self, name: str, file_index: int, part_numbers: list[int], include_digests: bool
    ) -> broker_pb2.PresignStorePartsResponse:
        """PresignStoreParts (sender)."""
        try:
            response: broker_pb2.PresignStorePartsResponse = await self._stub.PresignStoreParts(
                broker_pb2.PresignStorePartsRequest(
                    name=name,
                    file_index=file_index,
                    part_numbers=part_numbers,
                    include_digests=include_digests,
                ),
                timeout=self.timeout,
                metadata=self._meta(),
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError as err:
            raise BrokerError.from_rpc(err, "store upload") from None
        return response

    async def list_store_parts(
        self, name: str, file_index: int
    ) -> broker_pb2.ListStorePartsResponse:
        """ListStoreParts (sender)."""
        try:
            response: broker_pb2.ListStorePartsResponse = await self._stub.ListStoreParts(
                broker_pb2.ListStorePartsRequest(name=name, file_index=file_index),
                timeout=self.timeout,
                metadata=self._meta(),
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError as err:
            raise BrokerError.from_rpc(err, "store upload") from None
        return response

    async def complete_store_upload(
        self, name: str, file_index: int
    ) -> broker_pb2.CompleteStoreUploadResponse:
        """CompleteStoreUpload (sender)."""
        try:
            response: broker_pb2.CompleteStoreUploadResponse = await self._stub.CompleteStoreUpload(
                broker_pb2.CompleteStoreUploadRequest(name=name, file_index=file_index),
                timeout=self.timeout,
                metadata=self._meta(),
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError as err:
            raise BrokerError.from_rpc(err, "store upload") from None
        return response

    async def presign_store_download(
        self, name: str, file_index: int
    ) -> broker_pb2.PresignStoreDownloadResponse:
        """PresignStoreDownload (receiver)."""
        try:
            response: broker_pb2.PresignStoreDownloadResponse = (
                await self._stub.PresignStoreDownload(
                    broker_pb2.PresignStoreDownloadRequest(name=name, file_index=file_index),
                    timeout=self.timeout,
                    metadata=self._meta(),
                    wait_for_ready=True,
                )
            )
        except grpc.aio.AioRpcError as err:
            raise BrokerError.from_rpc(err, "store download") from None
        return response
