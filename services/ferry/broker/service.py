"""BrokerService for grpc.aio: unpack the call, ask the Broker, map refusals to rich statuses.

The only module that knows both the domain's refusals (errors.py) and gRPC. Every refusal
leaves as the status code of its class (:data:`STATUS_CODES`, looked up along the class's MRO)
plus a google.rpc.ErrorInfo(domain="ferry.v1", reason=...) in the `grpc-status-details-bin`
trailer. Unexpected exceptions are logged and become INTERNAL, never a bare UNKNOWN.

Requests whose bytes do not parse (a corrupt wire format, bad UTF-8 in a string field) are
refused with INVALID_ARGUMENT by :func:`add_to_server`'s handlers, before the servicer: left to
gRPC, each would be an UNKNOWN and a logged traceback (issue 10, finding 7's sibling).

Every call tells the service's metrics.Recorder how it ended (method, status code, the
refusal's reason, how long it took): the handlers of :func:`add_to_server` time it, and
:func:`abort` reports a refusal before its status leaves (through a context variable: each
call runs in its own task), so a scrape right after a call always counts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped, unused-ignore]
from grpc_status import rpc_status

from ferry.broker import errors, validation
from ferry.broker.core import Broker
from ferry.broker.errors import DOMAIN, BrokerRefusal, Reason
from ferry.broker.fallback import Fallback
from ferry.broker.metrics import Recorder
from ferry.v1 import broker_pb2, broker_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]


class _Measure:
    """One call's metrics: told once how it ended, by `abort` (before the status leaves, so
    that a client that reads the metrics next finds its call counted) or when it ends."""

    __slots__ = ("method", "metrics", "started")

    def __init__(self, method: str, metrics: Recorder) -> None:
        self.method = method
        self.metrics: Recorder | None = metrics
        self.started = time.perf_counter()

    def done(self, code: str, reason: str | None = None) -> None:
        if self.metrics is not None:
            self.metrics.call_done(self.method, code, reason, time.perf_counter() - self.started)
            self.metrics = None  # told once


#: The current call's metrics (each call runs in its own task, so in its own context).
_MEASURE: contextvars.ContextVar[_Measure | None] = contextvars.ContextVar(
    "ferry_measure", default=None
)


#: The status code of each kind of refusal: the one place where the domain meets gRPC.
STATUS_CODES: Mapping[type[BrokerRefusal], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Internal: grpc.StatusCode.INTERNAL,
}


def as_refusal(exc: Exception) -> BrokerRefusal:
    """The refusal the client sees for any exception from the domain (a bug: INTERNAL)."""
    if isinstance(exc, BrokerRefusal):
        return exc
    log.error("unexpected error in the broker", exc_info=exc)
    return errors.Internal(Reason.INTERNAL, "internal broker error")


def status_code(refusal: BrokerRefusal) -> grpc.StatusCode:
    """The status code of the nearest class in the refusal's MRO that STATUS_CODES lists."""
    for kind in type(refusal).__mro__:
        if issubclass(kind, BrokerRefusal) and kind in STATUS_CODES:
            return STATUS_CODES[kind]
    log.error("a refusal of no known kind: %r", refusal)
    return grpc.StatusCode.INTERNAL


async def abort(context: Context, refusal: BrokerRefusal) -> NoReturn:
    """End the call with the refusal's status code and message, and its reason in ErrorInfo."""
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=str(refusal.reason), domain=DOMAIN))
    code = status_code(refusal).value[0]
    measure = _MEASURE.get()
    if measure is not None:
        measure.done(status_code(refusal).name, str(refusal.reason))
    status = status_pb2.Status(code=code, message=refusal.message, details=[detail])
    await context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("abort_with_status returned")  # pragma: no cover


async def _acall(context: Context, fn: Callable[[], Awaitable[T]]) -> T:
    try:
        return await fn()
    except Exception as exc:
        refusal = as_refusal(exc)
    await abort(context, refusal)


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

    def __init__(
        self, broker: Broker, fallback: Fallback | None = None, metrics: Recorder | None = None
    ) -> None:
        self._broker = broker
        self._fallback = fallback or Fallback(broker, None)
        self.metrics = metrics or Recorder()

    def admit(self, context: Context) -> BrokerRefusal | None:
        """The refusal of a call from an address out of calls (per source: an IPv4 address,
        an IPv6 /64), checked before the request is looked at; None if it may go on."""
        broker = self._broker
        source = broker.limiter.source(validation.peer_ip(context.peer()))
        if broker.calls.take(source, broker.clock()):
            return None
        return errors.ResourceExhausted(
            Reason.RATE_LIMITED, "too many calls from this address; slow down and try again"
        )

    async def GetBrokerInfo(
        self, request: broker_pb2.GetBrokerInfoRequest, context: Context
    ) -> broker_pb2.GetBrokerInfoResponse:
        broker_id = await _acall(context, self._broker.broker_id)  # no token: public facts
        # What start_server filled in (":" and the responder's port), or the operator's
        # address; unset: this broker has no reflexive responder.
        reflexive = self._broker.config.reflexive_advertise or ""
        return broker_pb2.GetBrokerInfoResponse(broker_id=broker_id, reflexive_address=reflexive)

    async def CreateOffer(
        self, request: broker_pb2.CreateOfferRequest, context: Context
    ) -> broker_pb2.CreateOfferResponse:
        ip = validation.peer_ip(context.peer())
        token = bearer_token(context)

        async def create() -> broker_pb2.CreateOfferResponse:
            principal = await self._broker.accounts.maybe_principal(token)
            return await self._broker.create_offer(request, ip, principal)

        response = await _acall(context, create)
        self.metrics.offer_created()
        return response

    async def ClaimOffer(
        self, request: broker_pb2.ClaimOfferRequest, context: Context
    ) -> broker_pb2.ClaimOfferResponse:
        ip = validation.peer_ip(context.peer())
        token = bearer_token(context)
        return await _acall(context, lambda: self._claim(request, ip, token))

    async def _claim(
        self, request: broker_pb2.ClaimOfferRequest, ip: str | None, token: str | None
    ) -> broker_pb2.ClaimOfferResponse:
        validation.check_length(request.code, validation.MAX_CODE_CHARS, "code")
        validation.check_request_id(request.request_id)
        principal = await self._broker.accounts.maybe_principal(token)
        return await self._broker.claim_offer(
            request.code,
            ip,
            request.request_id,
            pake_message=request.pake_message,
            claim_verifier=request.claim_verifier,
            principal=principal,
        )

    # -- people -----------------------------------------------------------------------------

    async def EnrollDevice(
        self, request: broker_pb2.EnrollDeviceRequest, context: Context
    ) -> broker_pb2.EnrollDeviceResponse:
        ip = validation.peer_ip(context.peer())
        return await _acall(context, lambda: self._broker.accounts.enroll(request, ip))

    async def CreateChallenge(
        self, request: broker_pb2.CreateChallengeRequest, context: Context
    ) -> broker_pb2.CreateChallengeResponse:
        async def challenge() -> broker_pb2.CreateChallengeResponse:
            return self._broker.accounts.challenge(request.device_id)

        return await _acall(context, challenge)

    async def SignIn(
        self, request: broker_pb2.SignInRequest, context: Context
    ) -> broker_pb2.SignInResponse:
        ip = validation.peer_ip(context.peer())

        async def sign_in() -> broker_pb2.SignInResponse:
            broker_id = await self._broker.broker_id()
            return await self._broker.accounts.sign_in(request, broker_id, ip)

        return await _acall(context, sign_in)

    async def ListPeers(
        self, request: broker_pb2.ListPeersRequest, context: Context
    ) -> broker_pb2.ListPeersResponse:
        token = bearer_token(context)

        async def peers() -> broker_pb2.ListPeersResponse:
            accounts = self._broker.accounts
            return await accounts.peers(await accounts.principal(token), request.user)

        return await _acall(context, peers)

    async def ListInbox(
        self, request: broker_pb2.ListInboxRequest, context: Context
    ) -> broker_pb2.ListInboxResponse:
        token = bearer_token(context)

        async def inbox() -> broker_pb2.ListInboxResponse:
            principal = await self._broker.accounts.principal(token)
            offers, more = await self._broker.inbox(principal)
            return broker_pb2.ListInboxResponse(offers=offers, more=more)

        return await _acall(context, inbox)

    async def TakeOffer(
        self, request: broker_pb2.TakeOfferRequest, context: Context
    ) -> broker_pb2.TakeOfferResponse:
        token = bearer_token(context)

        async def take() -> broker_pb2.TakeOfferResponse:
            principal = await self._broker.accounts.principal(token)
            return await self._broker.take_offer(request.name, principal)

        return await _acall(context, take)

    async def WatchInbox(
        self, request: broker_pb2.WatchInboxRequest, context: Context
    ) -> AsyncIterator[broker_pb2.WatchInboxResponse]:
        token = bearer_token(context)
        ip = validation.peer_ip(context.peer())
        self.metrics.watch_opened()
        try:
            principal = await self._broker.accounts.principal(token)
            updates = self._broker.watch_inbox(principal, token, ip)
            async with contextlib.aclosing(updates):
                async for response in updates:
                    yield response
            return
        except Exception as exc:
            refusal = as_refusal(exc)
        finally:
            self.metrics.watch_closed()
        await abort(context, refusal)

    async def ConfirmKey(
        self, request: broker_pb2.ConfirmKeyRequest, context: Context
    ) -> broker_pb2.ConfirmKeyResponse:
        token = bearer_token(context)
        session = await _acall(
            context,
            lambda: self._broker.confirm_key(
                request.name, token, request.key_confirmation, request.certificate_mac
            ),
        )
        return broker_pb2.ConfirmKeyResponse(session=session)

    async def AcceptOffer(
        self, request: broker_pb2.AcceptOfferRequest, context: Context
    ) -> broker_pb2.AcceptOfferResponse:
        ip = validation.peer_ip(context.peer())
        token = bearer_token(context)
        session = await _acall(
            context, lambda: self._broker.accept(request.name, token, request.receiver, ip)
        )
        waited = session.update_time.ToNanoseconds() - session.create_time.ToNanoseconds()
        self.metrics.offer_accepted(waited / 1e9)
        return broker_pb2.AcceptOfferResponse(session=session)

    async def DeclineOffer(
        self, request: broker_pb2.DeclineOfferRequest, context: Context
    ) -> broker_pb2.DeclineOfferResponse:
        token = bearer_token(context)
        session = await _acall(
            context, lambda: self._broker.decline(request.name, token, request.reason)
        )
        return broker_pb2.DeclineOfferResponse(session=session)

    async def CancelSession(
        self, request: broker_pb2.CancelSessionRequest, context: Context
    ) -> broker_pb2.CancelSessionResponse:
        token = bearer_token(context)
        session = await _acall(
            context, lambda: self._broker.cancel(request.name, token, request.reason)
        )
        return broker_pb2.CancelSessionResponse(session=session)

    async def GetSession(
        self, request: broker_pb2.GetSessionRequest, context: Context
    ) -> broker_pb2.GetSessionResponse:
        token = bearer_token(context)
        session = await _acall(context, lambda: self._broker.get(request.name, token))
        return broker_pb2.GetSessionResponse(session=session)

    async def ReportProgress(
        self, request: broker_pb2.ReportProgressRequest, context: Context
    ) -> broker_pb2.ReportProgressResponse:
        token = bearer_token(context)
        session = await _acall(context, lambda: self._report(request, token))
        return broker_pb2.ReportProgressResponse(session=session)

    async def _report(
        self, request: broker_pb2.ReportProgressRequest, token: str | None
    ) -> broker_pb2.Session:
        """The report; a completion counts the transfer once, with the bytes each path
        carried as the receiver says (a repeated COMPLETED, a no-op on a completed session,
        counts nothing; of two racing, only the one whose write made it COMPLETED counts)."""
        path = request.path if request.HasField("path") else None
        session, wrote = await self._broker.report_change(
            request.name,
            token,
            request.state,
            request.bytes_done,
            request.failure_reason,
            path,
            request.file_digests,
        )
        if wrote and session.state == broker_pb2.Session.STATE_COMPLETED:
            size = sum(entry.size_bytes for entry in session.manifest.files)
            self.metrics.transfer_completed(
                session.path.route, size, request.bytes_direct, request.bytes_store
            )
        return session

    async def PublishCandidates(
        self, request: broker_pb2.PublishCandidatesRequest, context: Context
    ) -> broker_pb2.PublishCandidatesResponse:
        token = bearer_token(context)
        session = await _acall(
            context,
            lambda: self._broker.publish_candidates(
                request.name, token, request.attempt, request.candidates
            ),
        )
        return broker_pb2.PublishCandidatesResponse(session=session)

    async def ResumeSession(
        self, request: broker_pb2.ResumeSessionRequest, context: Context
    ) -> broker_pb2.ResumeSessionResponse:
        ip = validation.peer_ip(context.peer())
        token = bearer_token(context)
        session = await _acall(
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
        ip = validation.peer_ip(context.peer())
        self.metrics.watch_opened()
        try:
            async with contextlib.aclosing(self._broker.watch(request.name, token, ip)) as updates:
                async for session in updates:
                    yield broker_pb2.WatchSessionResponse(session=session)
            return
        except Exception as exc:
            refusal = as_refusal(exc)
        finally:
            self.metrics.watch_closed()
        await abort(context, refusal)


class _Undecodable:
    """What a request's bytes that do not parse deserialize to: the servicer never sees it."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return _Undecodable(str(exc))

    return deserialize


def _undecodable(request: _Undecodable) -> errors.InvalidArgument:
    return errors.InvalidArgument(
        Reason.INVALID_ARGUMENT, f"the request does not parse: {request.error}"
    )


Admit = Callable[[Context], BrokerRefusal | None]


async def _screen(request: Any, context: Context, admit: Admit) -> None:
    """End the call before its handler runs: a caller out of calls, or bytes that do not
    parse."""
    refusal = admit(context)
    if refusal is not None:
        await abort(context, refusal)
    if isinstance(request, _Undecodable):
        await abort(context, _undecodable(request))


@contextlib.contextmanager
def _measured(method: str, metrics: Recorder) -> Any:
    """Tell `metrics` how the call in the block ended: OK, its refusal's status code and
    reason, CANCELLED (the client went away), or UNKNOWN; and how long it took."""
    measure = _Measure(method, metrics)
    _MEASURE.set(measure)
    try:
        yield
    except asyncio.CancelledError:
        measure.done("CANCELLED")
        raise
    except BaseException:
        measure.done("UNKNOWN")  # unless abort told it first
        raise
    measure.done("OK")


def _guard_unary(
    behaviour: Callable[[Any, Context], Awaitable[Any]],
    admit: Admit,
    method: str,
    metrics: Recorder,
) -> Any:
    async def handle(request: Any, context: Context) -> Any:
        with _measured(method, metrics):
            await _screen(request, context, admit)
            return await behaviour(request, context)

    return handle


def _guard_stream(
    behaviour: Callable[[Any, Context], AsyncIterator[Any]],
    admit: Admit,
    method: str,
    metrics: Recorder,
) -> Any:
    """A server-streaming handler that writes ``behaviour``'s responses itself.

    A write fails only when the call is over (the client cancelled or went away while a
    response was on its way, as an idle watcher does): then there is nobody left to answer,
    and the handler just ends. Left to gRPC, each such write logged a traceback.
    """

    async def handle(request: Any, context: Context) -> None:
        with _measured(method, metrics):
            await _screen(request, context, admit)
            async with contextlib.aclosing(behaviour(request, context)) as responses:  # type: ignore[type-var]
                async for response in responses:
                    try:
                        await context.write(response)
                    except Exception as exc:  # grpc raises its private ExecuteBatchError
                        log.debug(
                            "watch ended mid-write: the client is gone (%s)", type(exc).__name__
                        )
                        return

    return handle


def add_to_server(servicer: BrokerService, server: grpc.aio.Server) -> None:
    """Serve ``servicer`` on ``server``, as broker_pb2_grpc.add_BrokerServiceServicer_to_server
    does, except that a call from an address out of calls is refused first (RATE_LIMITED,
    `BrokerService.admit`) and a request that does not parse with INVALID_ARGUMENT."""
    service = broker_pb2.DESCRIPTOR.services_by_name["BrokerService"]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        request_class = getattr(broker_pb2, method.input_type.name)
        response_class = getattr(broker_pb2, method.output_type.name)
        behaviour = getattr(servicer, method.name)
        make, guard = (
            (grpc.unary_stream_rpc_method_handler, _guard_stream)
            if method.server_streaming
            else (grpc.unary_unary_rpc_method_handler, _guard_unary)
        )
        handlers[method.name] = make(
            guard(behaviour, servicer.admit, method.name, servicer.metrics),
            request_deserializer=_lenient(request_class.FromString),
            response_serializer=response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)
