"""The reflexive responder's settings (BrokerConfig, ReflexiveLimits), without a server:
where "auto" puts it, what turns it off, and every value refused with a clear message."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ferry.broker.config import BrokerConfig
from ferry.broker.reflexive import ReflexiveLimits

pytestmark = pytest.mark.timeout(30)

TLS = {"tls_cert": Path("/tls/tls.crt"), "tls_key": Path("/tls/tls.key")}


@pytest.mark.parametrize(
    ("settings", "bind"),
    [
        ({}, "127.0.0.1:50052"),  # the default listen is 127.0.0.1:50051
        ({"listen": "127.0.0.1:0"}, "127.0.0.1:0"),  # a free port, as gRPC's
        ({"listen": "[::1]:7000"}, "[::1]:7001"),
        ({"listen": "localhost:7000"}, "localhost:7001"),
        ({"listen": "0.0.0.0:50051", **TLS}, "0.0.0.0:50052"),
        # never the health-only port: the next one (this is the k8s base's layout)
        ({"listen": "0.0.0.0:50051", "health_listen": "0.0.0.0:50052", **TLS}, "0.0.0.0:50053"),
        ({"listen": "127.0.0.1:50051", "health_listen": "127.0.0.1:0"}, "127.0.0.1:50052"),
        ({"reflexive_listen": "0.0.0.0:3478"}, "0.0.0.0:3478"),
        ({"reflexive_listen": "[::]:0"}, "[::]:0"),
        ({"reflexive_listen": ":3478"}, ":3478"),
        ({"reflexive_listen": "off"}, None),
        ({"reflexive_listen": ""}, None),
        ({"reflexive_listen": None}, None),
    ],
)
def test_where_the_responder_binds(settings: dict[str, object], bind: str | None) -> None:
    assert BrokerConfig(**settings).reflexive_bind == bind  # type: ignore[arg-type]


def test_defaults() -> None:
    config = BrokerConfig()
    assert config.reflexive_listen == "auto"
    assert config.reflexive_advertise is None  # start_server fills in ":" and the port
    assert (config.reflexive_max_connections, config.reflexive_per_address) == (1024, 32)
    assert config.reflexive_hold_s == 30.0


@pytest.mark.parametrize(
    "advertise", [":3478", "stun.example.net:3478", "192.0.2.1:1", "[2001:db8::1]:65535"]
)
def test_advertised_addresses(advertise: str) -> None:
    assert BrokerConfig(reflexive_advertise=advertise).reflexive_advertise == advertise
    # told even when this broker runs none (the operator runs one elsewhere)
    assert (
        BrokerConfig(reflexive_listen="off", reflexive_advertise=advertise).reflexive_bind is None
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"reflexive_listen": "3478"}, "reflexive_listen must be host:port, 'auto' or 'off'"),
        ({"reflexive_listen": "host:"}, "reflexive_listen must be host:port"),
        ({"reflexive_listen": "host:65536"}, "reflexive_listen must be host:port"),
        ({"reflexive_listen": "host:-1"}, "reflexive_listen must be host:port"),
        ({"reflexive_listen": "host:\u0663"}, "reflexive_listen must be host:port"),  # Arabic 3
        ({"reflexive_listen": "::1:3478"}, "reflexive_listen must be host:port"),  # brackets
        ({"reflexive_listen": "Auto"}, "reflexive_listen must be host:port, 'auto' or 'off'"),
        (
            {"listen": "127.0.0.1:65535"},
            "reflexive_listen 'auto' would be 127.0.0.1:65536, past port 65535",
        ),
        ({"listen": "localhost"}, "reflexive_listen 'auto' needs listen as host:port"),
        ({"reflexive_advertise": ":0"}, "reflexive_advertise must be host:port (port 1-65535"),
        ({"reflexive_advertise": "3478"}, "reflexive_advertise must be host:port"),
        ({"reflexive_advertise": "2001:db8::1:3478"}, "reflexive_advertise must be host:port"),
        (
            {"reflexive_max_connections": 0},
            "reflexive_max_connections and reflexive_per_address must be >= 1",
        ),
        (
            {"reflexive_per_address": -1},
            "reflexive_max_connections and reflexive_per_address must be >= 1",
        ),
        ({"reflexive_hold_s": 0.0}, "reflexive_hold_s must be > 0"),
    ],
)
def test_refused(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        BrokerConfig(**settings)  # type: ignore[arg-type]


def test_an_explicit_port_past_the_grpc_port_is_not_checked_for_auto() -> None:
    config = BrokerConfig(listen="127.0.0.1:65535", reflexive_listen="127.0.0.1:3478")
    assert config.reflexive_bind == "127.0.0.1:3478"
    assert BrokerConfig(listen="127.0.0.1:65535", reflexive_listen="off").reflexive_bind is None


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_connections": 0}, "max_connections, per_address and requests_per_connection"),
        ({"per_address": 0}, "max_connections, per_address and requests_per_connection"),
        ({"requests_per_connection": 0}, "max_connections, per_address and requests_per"),
        ({"hold_s": 0.0}, "hold_s and first_request_s must be > 0"),
        ({"first_request_s": -1.0}, "hold_s and first_request_s must be > 0"),
    ],
)
def test_responder_limits_refused(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ReflexiveLimits(**settings)  # type: ignore[arg-type]
