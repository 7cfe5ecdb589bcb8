"""Why the channel to the broker fails: a TLS problem to report at once, or just "unavailable".

gRPC reports a broker whose certificate it rejects exactly as one that is down: UNAVAILABLE,
with the reason only in its message text. Waiting out ``--broker-wait`` for a certificate
that will not change helps nobody, and the text is not an interface. So each time a call to
the broker finds it unavailable, the link asks this module, which repeats the handshake
with Python's ``ssl`` (the same CA certificates, client certificate and host name as the
channel, a few seconds at most) and reads the typed outcome::

    TCP connect fails, times out, or the handshake is cut off  -> None: really unavailable
    ssl.SSLCertVerificationError, by OpenSSL's verify_code    -> "untrusted", "expired",
                                                                  "not_yet_valid", "wrong_host"
    an answer that is not TLS (wrong version number)         -> "not_tls"
    another handshake failure, or an alert about our cert    -> "handshake" / "client_certificate"
    handshake done, then the HTTP/2 preface is answered      -> None: TLS is fine
    ... or the broker hangs up instead                       -> "client_certificate" (a broker
                                                                  that requires mutual TLS
                                                                  closes the connection)

For a plaintext channel (loopback) it checks the one mistake worth naming: the broker there
speaks TLS ("expects_tls").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl

from ferry.client._channel import BrokerAddress, ChannelTLS, root_certificates

__all__ = ["TLSProblem", "diagnose"]

#: The HTTP/2 client preface and an empty SETTINGS frame: a gRPC server answers it at once.
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")
#: What OpenSSL says when the other end answered, but not in TLS.
_NOT_TLS = frozenset(
    {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"}
)
#: Alerts a broker sends about this client's certificate (or its absence).
_CLIENT_CERT_ALERTS = frozenset(
    {
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "TLSV1_ALERT_ACCESS_DENIED",
        "SSLV3_ALERT_HANDSHAKE_FAILURE",
    }
)
# OpenSSL's X509_V_ERR_* codes.
_EXPIRED = 10
_NOT_YET_VALID = 9
_WRONG_HOST = frozenset({62, 64})  # hostname mismatch, IP address mismatch


@dataclasses.dataclass(frozen=True, slots=True)
class TLSProblem:
    """A TLS failure that waiting will not fix: ``kind`` for programs, ``message`` for
    people, ``verify_code`` OpenSSL's when the broker's certificate was refused."""

    kind: str
    message: str
    verify_code: int | None = None


def _context(address: BrokerAddress, tls: ChannelTLS) -> ssl.SSLContext:
    """What the gRPC channel checks, in Python's ssl."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    # Only what gRPC (BoringSSL) checks too: no stricter X.509 profile than the channel's.
    context.verify_flags &= ~getattr(ssl, "VERIFY_X509_STRICT", 0)
    roots = root_certificates(tls)
    if roots is not None:
        context.load_verify_locations(cadata=roots.decode("ascii", "replace"))
    if tls.cert_file is not None and tls.key_file is not None:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    context.set_alpn_protocols(["h2"])
    return context


def _unverified_context() -> ssl.SSLContext:
    """A context that only asks "is this TLS?" (for a plaintext address: nothing is sent)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only tells TLS from plaintext
    context.set_alpn_protocols(["h2"])
    return context


def _refused_certificate(exc: ssl.SSLCertVerificationError, address: BrokerAddress) -> TLSProblem:
    code, why = exc.verify_code, exc.verify_message
    at = f" at {address}"
    if code == _EXPIRED:
        return TLSProblem("expired", f"the broker's certificate has expired{at}", code)
    if code == _NOT_YET_VALID:
        return TLSProblem("not_yet_valid", f"the broker's certificate is not valid yet{at}", code)
    if code in _WRONG_HOST:
        return TLSProblem(
            "wrong_host", f"the broker's certificate is not valid for host {address.host}{at}", code
        )
    return TLSProblem(
        "untrusted",
        f"the broker's certificate is not trusted ({why}){at}; is its CA given "
        "(--broker-ca, FERRY_BROKER_CA)?",
        code,
    )


def _client_certificate(address: BrokerAddress, tls: ChannelTLS, why: str) -> TLSProblem:
    detail = f" ({why})" if why else ""
    if tls.cert_file is None:
        return TLSProblem(
            "client_certificate",
            f"the broker at {address} requires a client certificate{detail}; give one with "
            "--broker-cert and --broker-key (FERRY_BROKER_CERT, FERRY_BROKER_KEY)",
        )
    return TLSProblem(
        "client_certificate", f"the broker at {address} refused this client's certificate{detail}"
    )


def _reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.strerror or exc).upper()


async def _expects_tls(address: BrokerAddress, seconds: float) -> TLSProblem | None:
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(address.host, address.port, ssl=_unverified_context()),
            seconds,
        )
    except (OSError, TimeoutError, EOFError):  # ssl.SSLError is an OSError
        return None
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), seconds)
    secure = dataclasses.replace(address, tls=True)
    return TLSProblem(
        "expects_tls",
        f"the broker at {address.target} speaks TLS, not plaintext: use {secure} "
        "(and --broker-ca if its certificate is from a private CA)",
    )


async def diagnose(
    address: BrokerAddress, tls: ChannelTLS, seconds: float = 3.0
) -> TLSProblem | None:
    """The TLS problem of the channel to ``address``, or None if there is none to name (the
    broker is down, slow, or fine). Never raises for the network's sake; BrokerSettingsError
    only for a CA file that went missing since the channel was made."""
    if not address.tls:
        return await _expects_tls(address, seconds)
    context = _context(address, tls)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                address.host, address.port, ssl=context, server_hostname=address.host
            ),
            seconds,
        )
    except ssl.SSLCertVerificationError as exc:
        return _refused_certificate(exc, address)
    except ssl.SSLError as exc:
        reason = _reason(exc)
        words = reason.lower().replace("_", " ")
        if reason in _NOT_TLS:
            plain = dataclasses.replace(address, tls=False)
            return TLSProblem(
                "not_tls",
                f"the broker at {address} does not speak TLS ({words}); a plaintext broker "
                f"on this machine is reached as {plain}",
            )
        if reason in _CLIENT_CERT_ALERTS:
            return _client_certificate(address, tls, words)
        if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
            return None  # cut off: a broker going down looks the same
        message = f"the TLS handshake with the broker at {address} failed ({words})"
        return TLSProblem("handshake", message)
    except (OSError, TimeoutError, EOFError):
        return None
    try:
        writer.write(_PREFACE)
        answer = await asyncio.wait_for(reader.read(9), seconds)
        why = ""
    except ssl.SSLError as exc:
        answer, why = b"", _reason(exc).lower().replace("_", " ")
    except (ConnectionError, EOFError):
        answer, why = b"", ""
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), seconds)
    if answer:
        return None
    return _client_certificate(address, tls, why)
