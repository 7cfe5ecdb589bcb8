"""The root of every error Ferry's client side raises on purpose.

Each package keeps its own errors beside its code and documents its part of the tree there:
`ferry.client` (transfers and broker calls), `ferry.files` (what can be sent and where it may
land). All of them derive from :class:`FerryError`, so a program can catch everything Ferry
means to tell it with one ``except``, and the CLI turns any of them into one line and exit 1.
The broker has a tree of its own (`ferry.broker.errors`), never raised to a client: it
arrives as a gRPC status with a reason, which the client turns into `BrokerError`.
"""

from __future__ import annotations

__all__ = ["FerryError"]


class FerryError(Exception):
    """Something Ferry says went wrong; ``str(error)`` is one sentence for people."""
