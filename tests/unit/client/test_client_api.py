"""The public surface of ferry.client is exactly what we mean it to be, and its errors form
the documented tree (ferry.client._errors)."""

from __future__ import annotations

import ferry.client
import ferry.files
from ferry.errors import FerryError


def test_exported_names() -> None:
    assert sorted(ferry.client.__all__) == sorted(
        [
            "DEFAULT_CHUNK_SIZE",
            "DEFAULT_PORTS",
            "BrokerError",
            "BrokerSettingsError",
            "BrokerTLSError",
            "Client",
            "Completed",
            "Connected",
            "Declined",
            "Device",
            "DeviceKeyChanged",
            "DeviceRevoked",
            "Event",
            "FerryError",
            "FileResult",
            "GoneOffer",
            "InboxOffer",
            "InboxUpdate",
            "Incoming",
            "KnownDevices",
            "NotEnrolled",
            "OfferReplayed",
            "OfferedFile",
            "Outgoing",
            "PathInfo",
            "Paused",
            "Peer",
            "PeerDevice",
            "PeerProtocolError",
            "Progress",
            "SourceChangedError",
            "Stalled",
            "StorageFull",
            "TakenOffers",
            "TamperedError",
            "TransferError",
            "TransferOver",
            "TransferResult",
            "digest_file",
            "new_claim_exchange",
            "remove_partial",
            "store_refused",
        ]
    )
    for name in ferry.client.__all__:
        assert getattr(ferry.client, name) is not None


def test_error_tree() -> None:
    c = ferry.client
    parents = {
        c.BrokerError: FerryError,
        c.BrokerTLSError: c.BrokerError,
        c.TransferError: FerryError,
        c.TransferOver: c.TransferError,
        c.Declined: c.TransferOver,
        c.SourceChangedError: c.TransferError,
        c.PeerProtocolError: c.TransferError,
        c.Stalled: c.TransferError,
        c.StorageFull: c.TransferError,
    }
    for child, parent in parents.items():
        assert child.__bases__ == (parent,), child
    assert c.BrokerSettingsError.__bases__ == (FerryError, ValueError)
    assert c.FerryError is FerryError
    # What a rerun can continue is not "over"; what is over is not something to rerun.
    for kept in (c.Stalled, c.StorageFull, c.SourceChangedError, c.PeerProtocolError):
        assert not issubclass(kept, c.TransferOver)


def test_file_errors_are_ferry_errors_and_keep_their_builtin_kind() -> None:
    assert issubclass(ferry.files.ManifestError, FerryError)
    assert issubclass(ferry.files.UnsafePathError, FerryError)
    assert issubclass(ferry.files.UnsafePathError, ValueError)
    assert issubclass(ferry.files.DestinationExistsError, FerryError)
    assert issubclass(ferry.files.DestinationExistsError, FileExistsError)


def test_broker_error_says_whether_the_broker_answered() -> None:
    import grpc

    down = ferry.client.BrokerError(grpc.StatusCode.UNAVAILABLE, "broker info: unreachable")
    refused = ferry.client.BrokerError(grpc.StatusCode.NOT_FOUND, "code: no", "CODE_NOT_FOUND")
    shutting = ferry.client.BrokerError(
        grpc.StatusCode.UNAVAILABLE, "shutting down", "SHUTTING_DOWN"
    )
    assert down.unreachable
    assert not refused.unreachable
    assert not shutting.unreachable  # it answered: with a reason
    assert not down.retried
