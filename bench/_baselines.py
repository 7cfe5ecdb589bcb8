"""Baselines that Ferry's transfer benchmarks are compared with, in the same run.

- ``tls_copy``: a bare Python TLS 1.3 file copy over loopback. Blocking ``ssl`` sockets
  (OpenSSL releases the GIL, so sender and receiver threads use both cores), the
  sender reads the file 1 MiB at a time and ``sendall``s it; the receiver fills a
  1 MiB buffer, ``os.write``s it, and ``os.fsync``s once at the end.
- ``tcp_copy``: the same over plain TCP.

Both return the seconds from the client's connect until the receiver's fsync has
returned, and raise if the copy is not the source's size. Only 127.0.0.1 is used.
The TLS certificate is a throwaway self-signed one made on each call (outside the
timed part).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import socket
import ssl
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["tcp_copy", "tls_copy"]

HOST = "127.0.0.1"
DEFAULT_BUF = 1 << 20

Wrap = Callable[[socket.socket], socket.socket]


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """Write a throwaway P-256 key and a self-signed certificate for 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ferry-bench")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _tls_wrappers() -> tuple[Wrap, Wrap]:
    with tempfile.TemporaryDirectory(prefix="ferry-bench-tls-") as tmp:
        cert, key = _self_signed(Path(tmp))
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        server_ctx.load_cert_chain(cert, key)
        client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        client_ctx.load_verify_locations(cert)

    def server(sock: socket.socket) -> socket.socket:
        return server_ctx.wrap_socket(sock, server_side=True)

    def client(sock: socket.socket) -> socket.socket:
        return client_ctx.wrap_socket(sock, server_hostname=HOST)

    return server, client


def _receive(listener: socket.socket, dst: Path, buf: int, wrap: Wrap | None) -> tuple[int, float]:
    """Accept one connection, write what it sends to ``dst``, fsync; (bytes, end time)."""
    received = 0
    buffer = bytearray(buf)
    view = memoryview(buffer)
    try:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            raw, _ = listener.accept()
            with raw, wrap(raw) if wrap else raw as conn:
                eof = False
                while not eof:
                    filled = 0
                    while filled < buf:
                        n = conn.recv_into(view[filled:])
                        if n == 0:
                            eof = True
                            break
                        filled += n
                    written = 0
                    while written < filled:
                        written += os.write(fd, view[written:filled])
                    received += filled
                os.fsync(fd)
                end = time.perf_counter()
                if isinstance(conn, ssl.SSLSocket):
                    conn.unwrap()  # answer the sender's close_notify
        finally:
            os.close(fd)
    finally:
        listener.close()  # one connection only; also refuses a sender after a failure
    return received, end


def _send(src: Path, buf: int, port: int, wrap: Wrap | None) -> float:
    """Connect, send ``src`` in ``buf``-sized reads; return the connect start time."""
    buffer = bytearray(buf)
    view = memoryview(buffer)
    with src.open("rb", buffering=0) as f:
        start = time.perf_counter()
        raw = socket.create_connection((HOST, port))
        conn = wrap(raw) if wrap else raw
        with conn:
            while n := f.readinto(buffer):
                conn.sendall(view[:n])
            if isinstance(conn, ssl.SSLSocket):
                conn.unwrap()  # close_notify, then wait for the receiver's
            else:
                conn.shutdown(socket.SHUT_WR)
                conn.recv(1)  # the receiver closes after its fsync
    return start


def _copy(src: Path, dst: Path, buf: int, wrappers: tuple[Wrap, Wrap] | None) -> float:
    if buf <= 0:
        raise ValueError("buf must be positive")
    size = src.stat().st_size
    server_wrap, client_wrap = wrappers or (None, None)
    with (
        socket.create_server((HOST, 0), backlog=1) as listener,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="baseline-receiver") as pool,
    ):
        port = listener.getsockname()[1]
        receiver = pool.submit(_receive, listener, dst, buf, server_wrap)
        try:
            start = _send(src, buf, port, client_wrap)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes accept() if we never connected
            with contextlib.suppress(TimeoutError):
                if (error := receiver.exception(timeout=30)) is not None:
                    exc.add_note(f"receiver failed too: {error!r}")
            raise
        received, end = receiver.result()
    if received != size or dst.stat().st_size != size:
        raise RuntimeError(
            f"copy is wrong: sent {size} bytes, received {received}, wrote {dst.stat().st_size}"
        )
    return end - start


def tls_copy(src: Path, dst: Path, buf: int = DEFAULT_BUF) -> float:
    """Copy ``src`` to ``dst`` over loopback TLS 1.3; seconds from connect to fsync done."""
    return _copy(src, dst, buf, _tls_wrappers())


def tcp_copy(src: Path, dst: Path, buf: int = DEFAULT_BUF) -> float:
    """Copy ``src`` to ``dst`` over loopback TCP; seconds from connect to fsync done."""
    return _copy(src, dst, buf, None)
