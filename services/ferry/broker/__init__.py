"""Ferry's broker: the gRPC control plane that matches senders with receivers.

Public surface: BrokerConfig, start_server, serve, RunningBroker. The rest is internal.
"""

from ferry.broker.config import BrokerConfig
from ferry.broker.server import RunningBroker, serve, start_server

__all__ = ["BrokerConfig", "RunningBroker", "serve", "start_server"]
