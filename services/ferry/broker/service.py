"""BrokerService for grpc.aio: unpack the call, ask the Broker, map errors to rich statuses.

Every error leaves as a status code plus a google.rpc.ErrorInfo(domain="ferry.v1", reason=...)
in the `grpc-status-details-bin` trailer. Unexpected exceptions are logged and become INTERNAL,
never a bare UNKNOWN.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped, unused-ignore]
from grpc_status import rpc_status

from ferry.broker import states, validation
from ferry.broker.core import Broker
from ferry.broker.errors import DOMAIN, BrokerError, Reason
from ferry.broker.fallback import Fallback
from ferry.v1 import broker_pb2, broker_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]


async def abort(context: Context, code: grpc.StatusCode, message: str, reason: str) -> NoReturn:
    """End the call with `code`, `message` and an ErrorInfo carrying `reason`."""
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN))
    status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    await context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("abort_with_status returned")  # pragma: no cover


def as_broker_error(exc: Exception) -> BrokerError:
    """Map any exception from the domain to the error the client sees."""
    if isinstance(exc, BrokerError):
        return exc
    if isinstance(exc, states.NotPermitted):
        return BrokerError(grpc.StatusCode.PERMISSION_DENIED, Reason.WRONG_PARTY, str(exc))
    if isinstance(exc, states.IllegalTransition):
        return BrokerError(grpc.StatusCode.FAILED_PRECONDITION, Reason.ILLEGAL_TRANSITION, str(exc))
    log.error("unexpected error in the broker", exc_info=exc)
    return BrokerError(grpc.StatusCode.INTERNAL, Reason.INTERNAL, "internal broker error")


async def _call(context: Context, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except Exception as exc:
        error = as_broker_error(exc)
    await abort(context, error.code, error.message, error.reason)


async def _acall(context: Context, fn: Callable[[], Awaitable[T]]) -> T:
    try:
        return await fn()
    except Exception as exc:
        error = as_broker_error(exc)
    await abort(context, error.code, error.message, error.reason)


def bearer_token(context: Context) -> str | None:
    """The token of `authorization: Bearer <token>` metadata, if any."""
    for key, value in context.invocation_metadata() or ():
        if key.lower() == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class BrokerService(broker_pb2_grpc.BrokerServiceServicer):
    """The gRPC face of a Broker."""

    def __init__(self, broker: Broker, fallback: Fallback | None = None) -> None:
        self._broker = broker
        self._fallback = fallback or Fallback(broker, None)

    async def GetBrokerInfo(
        self, request: broker_pb2.GetBrokerInfoRequest, context: Context
    ) -> broker_pb2.GetBrokerInfoResponse:
        broker_id = await _call(context, self._broker.broker_id)  # no token: public facts
        return broker_pb2.GetBrokerInfoResponse(broker_id=broker_id)

    async def CreateOffer(
        self, request: broker_pb2.CreateOfferRequest, context: Context
    ) -> broker_pb2.CreateOfferResponse:
        ip = validation.peer_ip(context.peer())
        return await _call(context, lambda: self._broker.create_offer(request, ip))

    async def ClaimOffer(
        self, request: broker_pb2.ClaimOfferRequest, context: Context
    ) -> broker_pb2.ClaimOfferResponse:
        ip = validation.peer_ip(context.peer())
        return await _call(
            context, lambda: self._broker.claim_offer(request.code, ip, request.request_id)
        )

    async def AcceptOffer(
        self, request: broker_pb2.AcceptOfferRequest, context: Context
    ) -> broker_pb2.AcceptOfferResponse:
        ip = validation.peer_ip(context.peer())
        token = bearer_token(context)
        session = await _call(
            context, lambda: self._broker.accept(request.name, token, request.receiver, ip)
        )
        return broker_pb2.AcceptOfferResponse(session=session)

    async def DeclineOffer(
        self, request: broker_pb2.DeclineOfferRequest, context: Context
    ) -> broker_pb2.DeclineOfferResponse:
        token = bearer_token(context)
        session = await _call(
            context, lambda: self._broker.decline(request.name, token, request.reason)
        )
        return broker_pb2.DeclineOfferResponse(session=session)

    async def CancelSession(
        self, request: broker_pb2.CancelSessionRequest, context: Context
    ) -> broker_pb2.CancelSessionResponse:
        token = bearer_token(context)
        session = await _call(
            context, lambda: self._broker.cancel(request.name, token, request.reason)
        )
        return broker_pb2.CancelSessionResponse(session=session)

    async def GetSession(
        self, request: broker_pb2.GetSessionRequest, context: Context
    ) -> broker_pb2.GetSessionResponse:
        token = bearer_token(context)
        session = await _call(context, lambda: self._broker.get(request.name, token))
        return broker_pb2.GetSessionResponse(session=session)

    async def ReportProgress(
        self, request: broker_pb2.ReportProgressRequest, context: Context
    ) -> broker_pb2.ReportProgressResponse:
        token = bearer_token(context)
        session = await _call(
            context,
            lambda: self._broker.report(
                request.name, token, request.state, request.bytes_done, request.failure_reason
            ),
        )
        return broker_pb2.ReportProgressResponse(session=session)

    async def ResumeSession(
        self, request: broker_pb2.ResumeSessionRequest, context: Context
    ) -> broker_pb2.ResumeSessionResponse:
        ip = validation.peer_ip(context.peer())
        token = bearer_token(context)
        session = await _call(
            context, lambda: self._broker.resume(request.name, token, request.peer, ip)
        )
        return broker_pb2.ResumeSessionResponse(session=session)

    async def StartStoreUpload(
        self, request: broker_pb2.StartStoreUploadRequest, context: Context
    ) -> broker_pb2.StartStoreUploadResponse:
        token = bearer_token(context)
        return await _acall(
            context, lambda: self._fallback.start_upload(request.name, token, request.file_index)
        )

    async def PresignStoreParts(
        self, request: broker_pb2.PresignStorePartsRequest, context: Context
    ) -> broker_pb2.PresignStorePartsResponse:
        token = bearer_token(context)
        return await _acall(
            context,
            lambda: self._fallback.presign_parts(
                request.name,
                token,
                request.file_index,
                list(request.part_numbers),
                request.include_digests,
            ),
        )

    async def ListStoreParts(
        self, request: broker_pb2.ListStorePartsRequest, context: Context
    ) -> broker_pb2.ListStorePartsResponse:
        token = bearer_token(context)
        return await _acall(
            context, lambda: self._fallback.list_parts(request.name, token, request.file_index)
        )

    async def CompleteStoreUpload(
        self, request: broker_pb2.CompleteStoreUploadRequest, context: Context
    ) -> broker_pb2.CompleteStoreUploadResponse:
        token = bearer_token(context)
        return await _acall(
            context,
            lambda: self._fallback.complete_upload(
                request.name, token, request.file_index, request.parts
            ),
        )

    async def PresignStoreDownload(
        self, request: broker_pb2.PresignStoreDownloadRequest, context: Context
    ) -> broker_pb2.PresignStoreDownloadResponse:
        token = bearer_token(context)
        return await _acall(
            context,
            lambda: self._fallback.presign_download(request.name, token, request.file_index),
        )

    async def WatchSession(
        self, request: broker_pb2.WatchSessionRequest, context: Context
    ) -> AsyncIterator[broker_pb2.WatchSessionResponse]:
        token = bearer_token(context)
        try:
            async with contextlib.aclosing(self._broker.watch(request.name, token)) as updates:
                async for session in updates:
                    yield broker_pb2.WatchSessionResponse(session=session)
            return
        except Exception as exc:
            error = as_broker_error(exc)
        await abort(context, error.code, error.message, error.reason)
