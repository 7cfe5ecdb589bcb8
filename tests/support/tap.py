"""A passive observer on the wire: a TCP proxy on loopback that records every byte it relays.

``with TcpTap("127.0.0.1:50051") as tap:`` listens on ``tap.address`` and forwards each
connection to the upstream, keeping the bytes of both directions (``tap.recorded()``): what
anyone on the network path between a client and the broker could read. It changes nothing.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading

__all__ = ["TcpTap"]


class TcpTap:
    """A recording TCP relay to ``upstream`` (``host:port``), in threads."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self._server = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._server.getsockname()[1]}"
        self._lock = threading.Lock()
        self._data = bytearray()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []

    def recorded(self) -> bytes:
        """Everything relayed so far, both directions."""
        with self._lock:
            return bytes(self._data)

    def __enter__(self) -> TcpTap:
        self._server.settimeout(0.2)
        self._spawn(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in list(self._threads):
            thread.join(timeout=5)
        with self._lock:
            for sock in self._sockets:
                sock.close()
        self._server.close()

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            self._spawn(self._relay, client, upstream)

    def _relay(self, a: socket.socket, b: socket.socket) -> None:
        peer = {a: b, b: a}
        with selectors.DefaultSelector() as selector:
            for sock in (a, b):
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.2):
                    sock = a if key.fileobj is a else b
                    try:
                        chunk = sock.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        chunk = b""
                    if not chunk:
                        for s in (a, b):
                            with contextlib.suppress(OSError):
                                s.shutdown(socket.SHUT_RDWR)
                        return
                    with self._lock:
                        self._data += chunk
                    try:
                        peer[sock].setblocking(True)
                        peer[sock].sendall(chunk)
                        peer[sock].setblocking(False)
                    except OSError:
                        return
