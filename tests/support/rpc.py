"""What a refused gRPC call said: the broker's ErrorInfo reason."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped, unused-ignore]


def reason_of(error: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason in the status details ("" if there is none)."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    assert info.domain == "ferry.v1"
                    return str(info.reason)
    return ""
