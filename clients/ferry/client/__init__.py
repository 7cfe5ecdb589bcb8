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
raise TransferError (TransferOver: the session ended on the broker; SourceChangedError: a
file changed since it was offered; StorageFull: the destination is full, the data is kept);
broker refusals raise BrokerError with the gRPC status and reason. A broker that is down or
restarting is waited for (``Client(broker_wait=...)``, default 300 s) before that.
"""

from ferry.client._api import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_PORTS,
    Client,
    Completed,
    Connected,
    Event,
    FileResult,
    Incoming,
    OfferedFile,
    Outgoing,
    Paused,
    Progress,
    SourceChangedError,
    StorageFull,
    TransferError,
    TransferOver,
    TransferResult,
    remove_partial,
)
from ferry.client._broker import BrokerError

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_PORTS",
    "BrokerError",
    "Client",
    "Completed",
    "Connected",
    "Event",
    "FileResult",
    "Incoming",
    "OfferedFile",
    "Outgoing",
    "Paused",
    "Progress",
    "SourceChangedError",
    "StorageFull",
    "TransferError",
    "TransferOver",
    "TransferResult",
    "remove_partial",
]
