"""Ferry's broker: the gRPC control plane that matches senders with receivers.

Public surface: BrokerConfig, start_server, serve, RunningBroker, and the broker's command
line (add_arguments, config_from_arguments, configure_logging) that `python -m ferry.broker`
and `ferry serve` share. The rest is internal.

The server (gRPC, boto3) is imported on first use of start_server, serve or RunningBroker,
so that a program which only builds the broker's command line, like the `ferry` command for
its `serve` subcommand, does not pay for it on every run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ferry.broker.cli import add_arguments, config_from_arguments, configure_logging
from ferry.broker.config import BrokerConfig

if TYPE_CHECKING:
    from ferry.broker.server import RunningBroker, serve, start_server

__all__ = [
    "BrokerConfig",
    "RunningBroker",
    "add_arguments",
    "config_from_arguments",
    "configure_logging",
    "serve",
    "start_server",
]

_SERVER_NAMES = frozenset({"RunningBroker", "serve", "start_server"})


def __getattr__(name: str) -> Any:
    if name in _SERVER_NAMES:
        from ferry.broker import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
