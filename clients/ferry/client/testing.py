"""Test doubles shipped with the library: a whole Ferry broker inside this process.

`InProcessBroker` is the real broker (`ferry.broker.core.Broker` over an SQLite store in
memory, behind the real `BrokerService` servicer) with no server and no sockets in front of
it: its clients' calls go through the generated gRPC stub into an in-process channel, which
serializes each message as the wire would and hands it to the servicer's method. A refusal
reaches the program as the same `grpc.aio.AioRpcError` a broker process sends (status code,
message, google.rpc.ErrorInfo in the trailing metadata), so it sees exactly the `BrokerError`
it would see in production. Only the control plane is in-process: the two sides still
connect to each other over TCP (set ``FERRY_ADDRESSES=127.0.0.1`` to keep them on loopback).

A program's test, offer to verified bytes, with no broker to start::

    from ferry.client.testing import InProcessBroker

    async def test_send_and_receive(tmp_path):
        async with InProcessBroker() as broker:
            outgoing = await broker.client().offer([tmp_path / "report.pdf"])
            sending = asyncio.create_task(outgoing.transfer())
            incoming = await broker.client().claim(outgoing.code)
            result = await incoming.accept(tmp_path / "inbox")
            await sending
            await outgoing.close()
            await incoming.close()

``broker.client(**options)`` is ``Client(broker, **options)``: a broker is a
`ferry.client._broker.LinkFactory`, so any `Client` can be pointed at one. Within
``async with`` the broker also runs its expiry sweeper, as a broker process does; leaving the
block closes it, after which every call is UNAVAILABLE (a broker that is gone).

What differs from a broker process, on purpose: every caller is seen from
``127.0.0.1`` (``peer=`` changes it); there is no object store unless one is given
(``objects=``), so the Store* calls answer FAILED_PRECONDITION / STORE_UNAVAILABLE as a
broker without a bucket does; ``wait_for_ready`` changes nothing (the broker is always up
until closed).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any, NoReturn

import grpc
import grpc.aio

from ferry.broker.config import BrokerConfig
from ferry.broker.core import Broker, Clock
from ferry.broker.fallback import Fallback
from ferry.broker.objectstore import ObjectStore
from ferry.broker.service import BrokerService
from ferry.broker.store import SqliteStore, Store
from ferry.client._broker import DEFAULT_PATIENCE, DEFAULT_TIMEOUT, BrokerError, BrokerLink
from ferry.client._client import Client
from ferry.v1 import broker_pb2_grpc

__all__ = ["InProcessBroker"]

log = logging.getLogger(__name__)

#: How the servicer sees every caller (the broker records it as a reflexive candidate).
LOOPBACK_PEER = "ipv4:127.0.0.1:0"

_Metadata = Sequence[tuple[str, str | bytes]]


class InProcessBroker:
    """A real Ferry broker inside this process, reached without gRPC's transport.

    ``config`` tunes it like a broker process (offer and session lifetimes, stream count,
    claim rate limits; its listen address and data directory are not used). ``store``
    defaults to SQLite in memory (closed with the broker); ``clock`` lets a test move time
    (then `await broker.sweep()` expires what is due). ``address`` names the broker in messages
    (`Client.broker`); ``peer`` is the caller's address as the servicer sees it.
    """

    def __init__(
        self,
        config: BrokerConfig | None = None,
        *,
        store: Store | None = None,
        clock: Clock | None = None,
        objects: ObjectStore | None = None,
        address: str = "in-process",
        peer: str = LOOPBACK_PEER,
    ) -> None:
        self.address = address
        self.peer = peer
        self.store: Store = store if store is not None else SqliteStore(":memory:")
        config = config or BrokerConfig()
        #: The domain object itself: look at sessions, or `sweep()` after moving the clock.
        self.broker = (
            Broker(config, self.store) if clock is None else Broker(config, self.store, clock)
        )
        self.fallback = Fallback(self.broker, objects)
        registry = _Registry()
        servicer = BrokerService(self.broker, self.fallback)
        broker_pb2_grpc.add_BrokerServiceServicer_to_server(servicer, registry)  # type: ignore[arg-type]
        self._methods = registry.methods
        self._workers: set[asyncio.Task[None]] = set()  # the sweeper and the object cleaner
        self._calls: set[asyncio.Task[None]] = set()  # the servers of streaming calls
        self.closed = False

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> InProcessBroker:
        await self.broker.sweep()
        self._spawn(self.broker.run_sweeper(), self._workers)
        self._spawn(self.fallback.run_cleaner(), self._workers)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self, grace: float = 1.0) -> None:
        """Stop as a broker process stops: end the watches (waiting up to ``grace`` seconds
        for them, then cancelling them), then refuse every call."""
        if self.closed:
            return
        self.closed = True
        self.broker.hub.close()
        for task in self._workers:
            task.cancel()
        if self._calls:
            await asyncio.wait(self._calls, timeout=grace)
        for task in self._calls:
            task.cancel()
        await asyncio.gather(*self._workers, *self._calls, return_exceptions=True)
        await self.store.close()

    def _spawn(
        self, work: Coroutine[Any, Any, None], tasks: set[asyncio.Task[None]]
    ) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=f"ferry-in-process-broker:{self.address}")
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    # -- clients ----------------------------------------------------------------------------

    def __call__(
        self,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        patience: float = DEFAULT_PATIENCE,
        on_wait: Callable[[BrokerError], None] | None = None,
    ) -> BrokerLink:
        """A new link to this broker (a `LinkFactory`: a Client calls this for each use)."""
        return BrokerLink(
            self.address,
            timeout=timeout,
            patience=patience,
            on_wait=on_wait,
            channel=_Channel(self),
        )

    def client(self, **options: Any) -> Client:
        """A `Client` of this broker; ``options`` as for `Client` (ports, timeout, ...)."""
        return Client(self, **options)

    # -- calls ------------------------------------------------------------------------------

    def _method(self, method: str) -> Any:
        """The servicer's handler of ``method``, or the error a broker that is gone gives."""
        if self.closed:
            raise _error(grpc.StatusCode.UNAVAILABLE, "the in-process broker is closed")
        handler = self._methods.get(method)
        if handler is None:
            raise _error(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        return handler

    async def _unary(
        self, method: str, request: bytes, seconds: float | None, metadata: _Metadata | None
    ) -> bytes:
        """One unary call, as bytes in and out: the servicer's answer or its abort."""
        handler = self._method(method)
        context = _Context(metadata, self.peer)
        try:
            response = await asyncio.wait_for(
                handler.unary_unary(handler.request_deserializer(request), context), seconds
            )
        except _Abort as abort:
            raise abort.error() from None
        except TimeoutError:
            raise _error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except Exception as exc:
            raise _unexpected(exc) from None
        return bytes(handler.response_serializer(response))

    def _stream(
        self, method: str, request: bytes, timeout: float | None, metadata: _Metadata | None
    ) -> _StreamCall:
        """One server-streaming call; the servicer runs as its own task, as on a server.
        As with grpc.aio, a call that cannot start fails when it is read."""
        call = _StreamCall(timeout)
        try:
            handler = self._method(method)
        except grpc.aio.AioRpcError as error:
            call.end(error)
            return call
        message = handler.request_deserializer(request)
        context = _Context(metadata, self.peer)
        call.task = self._spawn(call.serve(handler, message, context), self._calls)
        return call


def _as_is(message: Any) -> Any:
    return message


class _Registry:
    """Stands in for a server while the generated code registers the servicer's methods."""

    def __init__(self) -> None:
        self.methods: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        """The same methods as the registered ones below."""

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, Any]) -> None:
        for name, handler in handlers.items():
            self.methods[f"/{service}/{name}"] = handler


class _Abort(Exception):
    """How the servicer's abort leaves it (grpc.aio raises too)."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: _Metadata) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.trailing = tuple(trailing)

    def error(self) -> grpc.aio.AioRpcError:
        return _error(self.code, self.details, self.trailing)


def _error(code: grpc.StatusCode, details: str, trailing: _Metadata = ()) -> grpc.aio.AioRpcError:
    """What the client side of a call raises, as grpc.aio builds it."""
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details=details
    )


def _unexpected(exc: Exception) -> grpc.aio.AioRpcError:
    """A servicer that raised instead of aborting: grpc.aio logs it and answers UNKNOWN."""
    log.error("Exception calling application: %s", exc, exc_info=exc)
    return _error(grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc)}: {exc}")


class _Context:
    """The part of grpc.aio.ServicerContext that BrokerService uses."""

    def __init__(self, metadata: _Metadata | None, peer: str) -> None:
        self._metadata = grpc.aio.Metadata(*(metadata or ()))
        self._peer = peer

    def invocation_metadata(self) -> grpc.aio.Metadata:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: _Metadata = ()
    ) -> NoReturn:
        if code == grpc.StatusCode.OK:
            raise ValueError("abort() needs a status code other than OK")
        raise _Abort(code, details, trailing_metadata)

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        await self.abort(status.code, status.details, status.trailing_metadata)


class _StreamCall:
    """A server-streaming call: iterate it, then `cancel()` it (as grpc.aio's call)."""

    def __init__(self, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        self._deadline = None if timeout is None else loop.time() + timeout
        self._queue: asyncio.Queue[bytes | grpc.aio.AioRpcError | None] = asyncio.Queue()
        self._cancelled = False
        self.task: asyncio.Task[None] | None = None
        self.deserialize: Callable[[bytes], Any] = _as_is

    def end(self, error: grpc.aio.AioRpcError) -> None:
        """Fail the call before it started."""
        self._queue.put_nowait(error)

    async def serve(self, handler: Any, request: object, context: _Context) -> None:
        """The server side: run the servicer's stream into the queue."""
        try:
            async for message in handler.unary_stream(request, context):
                self._queue.put_nowait(bytes(handler.response_serializer(message)))
        except _Abort as abort:
            self._queue.put_nowait(abort.error())
        except asyncio.CancelledError:  # by the client (it reads no more) or a broker closing
            self._queue.put_nowait(_error(grpc.StatusCode.CANCELLED, "the broker closed the call"))
            raise
        except Exception as exc:
            self._queue.put_nowait(_unexpected(exc))
        else:
            self._queue.put_nowait(None)  # the servicer ended the stream

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._read()

    async def _read(self) -> AsyncIterator[Any]:
        while True:
            if self._cancelled:  # as grpc.aio does when reading a call cancelled here
                raise asyncio.CancelledError
            try:
                async with asyncio.timeout_at(self._deadline):
                    item = await self._queue.get()
            except TimeoutError:
                self.cancel()
                raise _error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
            if item is None:
                return
            if isinstance(item, grpc.aio.AioRpcError):
                raise item
            yield self.deserialize(item)

    def cancel(self) -> bool:
        """End the call; the servicer's stream is cancelled as a server cancels it."""
        if self.task is None or self.task.done():
            return False
        self._cancelled = True
        self.task.cancel()
        return True


class _Method:
    """One RPC of the in-process channel: its name and (de)serializers, as grpc.aio has them."""

    def __init__(
        self,
        broker: InProcessBroker,
        method: str,
        serialize: Callable[[Any], bytes] | None,
        deserialize: Callable[[bytes], Any] | None,
    ) -> None:
        self._broker = broker
        self._method = method
        self._serialize = serialize or _as_is
        self._deserialize = deserialize or _as_is


class _UnaryUnary(_Method):
    def __call__(
        self,
        request: object,
        *,
        timeout: float | None = None,
        metadata: _Metadata | None = None,
        credentials: object = None,
        wait_for_ready: bool | None = None,
        compression: object = None,
    ) -> Awaitable[Any]:
        return self._call(self._serialize(request), timeout, metadata)

    async def _call(self, request: bytes, seconds: float | None, metadata: _Metadata | None) -> Any:
        return self._deserialize(
            await self._broker._unary(self._method, request, seconds, metadata)
        )


class _UnaryStream(_Method):
    def __call__(
        self,
        request: object,
        *,
        timeout: float | None = None,
        metadata: _Metadata | None = None,
        credentials: object = None,
        wait_for_ready: bool | None = None,
        compression: object = None,
    ) -> _StreamCall:
        call = self._broker._stream(self._method, self._serialize(request), timeout, metadata)
        call.deserialize = self._deserialize
        return call


class _Channel(grpc.aio.Channel):
    """A channel into an InProcessBroker: the generated stub's calls, served in-process."""

    def __init__(self, broker: InProcessBroker) -> None:
        self._broker = broker

    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool = False,
    ) -> Any:
        return _UnaryUnary(self._broker, method, request_serializer, response_deserializer)

    def unary_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool = False,
    ) -> Any:
        return _UnaryStream(self._broker, method, request_serializer, response_deserializer)

    def stream_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool = False,
    ) -> Any:
        raise NotImplementedError("ferry.v1 has no client-streaming call")

    def stream_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool = False,
    ) -> Any:
        raise NotImplementedError("ferry.v1 has no bidirectional call")

    async def close(self, grace: float | None = None) -> None:
        """Nothing to close: the broker outlives its links."""

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        if self._broker.closed:
            return grpc.ChannelConnectivity.TRANSIENT_FAILURE
        return grpc.ChannelConnectivity.READY

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        raise NotImplementedError("an in-process channel changes state only when closed")

    async def channel_ready(self) -> None:
        """At once: the broker is there from its creation on."""

    async def __aenter__(self) -> _Channel:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
