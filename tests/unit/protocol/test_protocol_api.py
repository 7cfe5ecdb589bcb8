"""The public surface of ferry.protocol is exactly what we mean it to be."""

from __future__ import annotations

import ferry.protocol


def test_exported_names() -> None:
    assert sorted(ferry.protocol.__all__) == sorted(
        [
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
    )
    for name in ferry.protocol.__all__:
        assert getattr(ferry.protocol, name) is not None


def test_local_and_remote_protocol_errors_are_different_types() -> None:
    p = ferry.protocol
    assert p.LocalProtocolError.__bases__ == (p.ProtocolError,)
    assert p.RemoteProtocolError.__bases__ == (p.ProtocolError,)
    assert p.TooManyCorruptChunks.__bases__ == (p.RemoteProtocolError,)
