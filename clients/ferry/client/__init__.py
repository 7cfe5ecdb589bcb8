"""Ferry's Python client library (asyncio).

Send::

    client = ferry.client.Client("127.0.0.1:50051")
    outgoing = await client.offer(["report.pdf", "photos/"])
    print("code:", outgoing.code)
    result = await outgoing.transfer()          # waits for the receiver, then sends

Receive::

    incoming = await client.claim("7-orbit-lantern-quiet")
    print([f.path for f in incoming.files], incoming.total_size)
    result = await incoming.accept("Downloads/")  # or: await incoming.decline()

Both return a TransferResult (files with their whole-file digests, bytes, seconds) or
raise TransferError; broker refusals raise BrokerError with the gRPC status and reason.
``Client("grpcs://broker.example:50051")`` talks TLS to the broker (checked against the
system's CAs, or ``broker_ca=``); a certificate problem raises BrokerTLSError at once.
Everything derives from FerryError; the tree, and what each case means, is drawn in
`ferry.client._errors`. A broker that is down or
restarting is waited for (``Client(broker_wait=...)``, default 300 s) before that.

People (a device enrolled with the operator's token; no code)::

    client = ferry.client.Client("127.0.0.1:50051", device=ferry.client.Device.load(broker_id))
    outgoing = await client.offer(["report.pdf"], to="alice")   # to each of alice's devices
    async for update in client.inbox():                          # on alice's devices
        incoming = await client.take(update.offers[0].name)      # the first device wins
"""

from ferry.client._broker import BrokerError, BrokerTLSError
from ferry.client._channel import BrokerSettingsError
from ferry.client._client import Client, new_claim_exchange
from ferry.client._errors import (
    Declined,
    PeerProtocolError,
    SourceChangedError,
    Stalled,
    StorageFull,
    TamperedError,
    TransferError,
    TransferOver,
)
from ferry.client._events import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_PORTS,
    Completed,
    Connected,
    Event,
    FileResult,
    OfferedFile,
    PathInfo,
    Paused,
    Progress,
    TransferResult,
)
from ferry.client._identity import (
    Device,
    DeviceKeyChanged,
    KnownDevices,
    OfferReplayed,
    TakenOffers,
)
from ferry.client._incoming import Incoming, remove_partial
from ferry.client._outgoing import Outgoing
from ferry.client._people import (
    DeviceRevoked,
    GoneOffer,
    InboxOffer,
    InboxUpdate,
    NotEnrolled,
    Peer,
    PeerDevice,
    store_refused,
)
from ferry.client._send import digest_file
from ferry.errors import FerryError

__all__ = [
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
