"""Ferry's peer protocol, sans-I/O: frames, handshake, the conversation's table, each side's
connection object, and both sides' chunk bookkeeping.

Nothing here touches a socket, a file, a clock or an event loop; the I/O code around it
(`ferry.client`) only moves bytes. See proto/ferry/v1/peer.proto for the wire format.
"""

from ferry.protocol.connection import ReceiverConnection, SenderConnection
from ferry.protocol.conversation import MOVES, Conversation, Kind, Role, State, Way
from ferry.protocol.digests import FILE_DIGEST_ALGORITHM, chunk_digest, file_digest
from ferry.protocol.events import (
    NEED_DATA,
    ChunkArrived,
    ChunkData,
    ChunksRequested,
    DigestRequested,
    Event,
    FileConfirmed,
    Finished,
    Greeted,
    NeedData,
)
from ferry.protocol.frames import (
    ChunkPayload,
    ChunkStart,
    Control,
    FrameReader,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    encode_chunk_head,
    encode_control,
)
from ferry.protocol.handshake import (
    PROTOCOL_VERSION,
    PeerAborted,
    abort,
    aborted,
    check_hello,
    done,
    hello,
)
from ferry.protocol.ranges import chunk_count, runs
from ferry.protocol.receiver import ChunkTarget, ReceiveSession, TooManyCorruptChunks
from ferry.protocol.sender import ChunkWork, SendSession

__all__ = [
    "FILE_DIGEST_ALGORITHM",
    "MOVES",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "ChunkArrived",
    "ChunkData",
    "ChunkPayload",
    "ChunkStart",
    "ChunkTarget",
    "ChunkWork",
    "ChunksRequested",
    "Control",
    "Conversation",
    "DigestRequested",
    "Event",
    "FileConfirmed",
    "Finished",
    "FrameReader",
    "Greeted",
    "Kind",
    "LocalProtocolError",
    "NeedData",
    "PeerAborted",
    "ProtocolError",
    "ReceiveSession",
    "ReceiverConnection",
    "RemoteProtocolError",
    "Role",
    "SendSession",
    "SenderConnection",
    "State",
    "TooManyCorruptChunks",
    "Way",
    "abort",
    "aborted",
    "check_hello",
    "chunk_count",
    "chunk_digest",
    "done",
    "encode_chunk_head",
    "encode_control",
    "file_digest",
    "hello",
    "runs",
]
