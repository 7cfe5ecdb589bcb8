"""Interface discovery: the addresses this host offers its peer."""

from __future__ import annotations

import ipaddress
import os

import psutil

from ferry.client._tls import Identity
from ferry.v1 import broker_pb2

__all__ = ["local_candidates", "peer_info"]


def local_candidates() -> list[broker_pb2.Candidate]:
    """The addresses this host offers its peer: every interface's that is up (IPv4 and IPv6,
    no link-local), or exactly those listed in FERRY_ADDRESSES (comma-separated), which keeps a
    multi-homed host (or a test) to the networks it means."""
    chosen = os.environ.get("FERRY_ADDRESSES", "").strip()
    if chosen:
        texts = [t.strip() for t in chosen.split(",") if t.strip()]
    else:
        # Interfaces that are down lead nowhere (their addresses stay listed): not offered.
        stats = psutil.net_if_stats()
        texts = [
            a.address
            for name, addresses in psutil.net_if_addrs().items()
            if name not in stats or stats[name].isup
            for a in addresses
        ]
    seen: list[broker_pb2.Candidate] = []
    for text in texts:
        try:
            ip = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            if chosen:
                raise ValueError(f"FERRY_ADDRESSES: {text!r} is not an IP address") from None
            continue  # MAC addresses and the like
        if ip.is_link_local or ip.is_multicast or ip.is_unspecified:
            continue
        seen.append(broker_pb2.Candidate(ip=str(ip), kind=broker_pb2.Candidate.KIND_HOST))
    seen.sort(key=lambda c: (not ipaddress.ip_address(c.ip).is_loopback, c.ip))
    return seen


def peer_info(identity: Identity, ports: tuple[int, int]) -> broker_pb2.PeerInfo:
    """What this side tells the broker about itself for one connection attempt: its
    candidate addresses, the ports it may listen on, and its certificate for this transfer."""
    return broker_pb2.PeerInfo(
        candidates=local_candidates(),
        allowed_ports=broker_pb2.PortRange(first_port=ports[0], last_port=ports[1]),
        certificate_der=identity.cert_der,
    )
