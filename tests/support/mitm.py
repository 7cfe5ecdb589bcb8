"""A man in the middle of a client's broker link: a gRPC proxy that can read and rewrite
every message, as an attacker on a plaintext link, or a broker that misbehaves on purpose,
could.

`BrokerMitm` serves BrokerService on a loopback port of its own (in a thread, with its own
event loop) and forwards every call to the real broker, unary and streaming alike, with the
caller's metadata; refusals come back with their status, details and ErrorInfo. Before a
request goes up, ``on_request(method, request)`` may change it in place; before a response
goes down, ``on_response(method, response)`` may. Every request and response is kept in
``seen`` (method, message) for the test to read, as a passive observer would.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio

from ferry.v1 import broker_pb2

__all__ = ["BrokerMitm", "Hook"]

Hook = Callable[[str, Any], None]

_SERVICE = broker_pb2.DESCRIPTOR.services_by_name["BrokerService"]
_STARTUP_TIMEOUT = 10.0


def _nothing(method: str, message: Any) -> None:
    del method, message


class BrokerMitm:
    """A rewriting proxy in front of the broker at ``upstream`` (``host:port``)."""

    def __init__(
        self, upstream: str, on_request: Hook = _nothing, on_response: Hook = _nothing
    ) -> None:
        self.upstream = upstream
        self.on_request = on_request
        self.on_response = on_response
        self.seen: list[tuple[str, Any]] = []
        self.address = ""
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def messages(self, method: str) -> list[Any]:
        """What went through for ``method`` (requests and responses, in order)."""
        with self._lock:
            return [m for name, m in self.seen if name == method]

    def _keep(self, method: str, message: Any) -> None:
        copy = type(message)()
        copy.CopyFrom(message)
        with self._lock:
            self.seen.append((method, copy))

    def __enter__(self) -> BrokerMitm:
        self._thread = threading.Thread(target=self._main, name="broker-mitm", daemon=True)
        self._thread.start()
        if not self._ready.wait(_STARTUP_TIMEOUT) or not self.address:
            self.__exit__()
            raise RuntimeError(f"the MITM proxy did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(timeout=15)
            assert not self._thread.is_alive(), "the MITM proxy's thread did not end"

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        channel = grpc.aio.insecure_channel(self.upstream)
        server = grpc.aio.server()
        handlers = {m.name: self._handler(channel, m) for m in _SERVICE.methods}
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(_SERVICE.full_name, handlers),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self.address = f"127.0.0.1:{port}"
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await server.stop(0.5)
            await channel.close()

    def _handler(self, channel: grpc.aio.Channel, method: Any) -> grpc.RpcMethodHandler[Any, Any]:
        name = method.name
        request_type = getattr(broker_pb2, method.input_type.name)
        response_type = getattr(broker_pb2, method.output_type.name)
        path = f"/{_SERVICE.full_name}/{name}"
        serialize = response_type.SerializeToString

        def up(request: Any) -> Any:
            self.on_request(name, request)
            self._keep(name, request)
            return request

        def down(response: Any) -> Any:
            self.on_response(name, response)
            self._keep(name, response)
            return response

        if method.server_streaming:
            call = channel.unary_stream(
                path,
                request_serializer=request_type.SerializeToString,
                response_deserializer=response_type.FromString,
            )

            async def stream(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                try:
                    async for response in call(up(request), metadata=context.invocation_metadata()):
                        yield down(response)
                except grpc.aio.AioRpcError as err:
                    await _relay(context, err)

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=request_type.FromString,
                response_serializer=serialize,
            )

        unary = channel.unary_unary(
            path,
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )

        async def once(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                response = await unary(up(request), metadata=context.invocation_metadata())
            except grpc.aio.AioRpcError as err:
                await _relay(context, err)
            return down(response)

        return grpc.unary_unary_rpc_method_handler(
            once, request_deserializer=request_type.FromString, response_serializer=serialize
        )


async def _relay(context: grpc.aio.ServicerContext[Any, Any], err: grpc.aio.AioRpcError) -> None:
    """Send the broker's refusal on as it came (status, details, ErrorInfo)."""
    trailing = err.trailing_metadata()
    if trailing:
        context.set_trailing_metadata(tuple(trailing))
    await context.abort(err.code(), err.details() or "")
