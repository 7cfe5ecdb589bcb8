"""A small internet in network namespaces, for the NAT tests (issue 11).

::

    broker 203.0.113.10 ─┐
                         ├─ public segment 203.0.113.0/24 (a bridge in its own namespace)
    nat_a  203.0.113.1  ─┤        nat_b 203.0.113.2
      │ 192.0.2.1                   │ 198.51.100.1
    a 192.0.2.10                  b 198.51.100.10

Each NAT router masquerades its LAN behind its public address and filters what comes in
from the public side. Its kind:

- ``"cone"``: masquerade (Linux keeps the private port as the public one unless it clashes)
  and drop whatever is not part of a connection the LAN side began (a drop-filtering NAT);
- ``"reset"``: the same, but unsolicited SYNs are answered with a reset;
- ``"symmetric"``: ``masquerade random``: every connection gets a random public port;
- ``"open"``: no NAT at all (the host is on the public side, routed).

Nothing routes out of the machine: the namespaces have no link to the host's own network.
Every lab has its own namespace names (a random tag), so labs never meet, and `lab` tears
all of it down at the end, also when the block fails. Building one takes about 0.1 s.

Needs root, `ip` (iproute2) and `nft` (nftables): `ensure_tools` installs the two packages
with apt-get when they are missing, as `.ci/run` does, so the README's test command alone
provisions them too.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

NatKind = Literal["cone", "reset", "symmetric", "open"]

PUBLIC_NET = "203.0.113"
BROKER_IP = f"{PUBLIC_NET}.10"
LANS = {"a": ("192.0.2", f"{PUBLIC_NET}.1"), "b": ("198.51.100", f"{PUBLIC_NET}.2")}

_PACKAGES = {"ip": "iproute2", "nft": "nftables"}


def ensure_tools() -> None:
    """Install iproute2 and nftables if `ip` or `nft` is missing (root and apt-get needed)."""
    missing = sorted({pkg for tool, pkg in _PACKAGES.items() if shutil.which(tool) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"the network lab needs root to install {missing}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        check=True,
        env=env,
        capture_output=True,
    )


def _run(*args: str, stdin: str | None = None) -> None:
    done = subprocess.run(args, input=stdin, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")


def _nat_rules(kind: NatKind) -> str:
    """The router's nftables ruleset: masquerade out of `wan`, filter what comes in."""
    masquerade = "masquerade random" if kind == "symmetric" else "masquerade"
    unsolicited = (
        'iifname "wan" tcp flags & (syn | ack) == syn reject with tcp reset'
        if kind == "reset"
        else 'iifname "wan" drop'
    )
    return f"""
table ip lab {{
    chain post {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" {masquerade}
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan" accept
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        ct state established,related accept
        {unsolicited}
    }}
}}
"""


@dataclass
class Lab:
    """One built lab: its namespaces by role, and how to run things in them."""

    tag: str
    nats: dict[str, NatKind]
    names: list[str] = field(default_factory=list)
    #: Every host (a, b and those `add_host` adds) and its LAN address.
    hosts: dict[str, str] = field(default_factory=dict)

    def ns(self, role: str) -> str:
        """The namespace name of ``role`` (broker, a, b, nat_a, nat_b, public)."""
        return f"fl{self.tag}-{role}"

    def ip(self, host: str) -> str:
        """The address of host ``broker``, ``a`` or ``b`` (a LAN address behind a NAT)."""
        if host == "broker":
            return BROKER_IP
        return self.hosts[host]

    def public_ip(self, host: str) -> str:
        """The address others see ``a`` or ``b`` come from (its NAT's, or its own)."""
        return self.ip(host) if self.nats[host] == "open" else LANS[self.lan_of(host)][1]

    def command(self, host: str, args: Sequence[str]) -> list[str]:
        """``args`` to run inside ``host``'s namespace."""
        return ["ip", "netns", "exec", self.ns(host), *args]

    def python(self, host: str, code: str) -> list[str]:
        """A command running ``code`` with this interpreter inside ``host``'s namespace."""
        return self.command(host, [sys.executable, "-c", code])

    def _add(self, role: str) -> str:
        name = self.ns(role)
        _run("ip", "netns", "add", name)
        self.names.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def _veth(self, ns1: str, if1: str, ns2: str, if2: str) -> None:
        _run("ip", "link", "add", if1, "netns", ns1, "type", "veth", "peer", "name", if2,
             "netns", ns2)  # fmt: skip
        _run("ip", "-n", ns1, "link", "set", if1, "up")
        _run("ip", "-n", ns2, "link", "set", if2, "up")

    def build(self) -> None:
        public = self._add("public")
        _run("ip", "-n", public, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", public, "link", "set", "br0", "up")
        broker = self._add("broker")
        self._veth(public, "p-broker", broker, "wan")
        _run("ip", "-n", public, "link", "set", "p-broker", "master", "br0")
        _run("ip", "-n", broker, "addr", "add", f"{BROKER_IP}/24", "dev", "wan")
        for host, (prefix, public_ip) in LANS.items():
            router = self._add(f"nat_{host}")
            self._veth(public, f"p-{host}", router, "wan")
            _run("ip", "-n", public, "link", "set", f"p-{host}", "master", "br0")
            _run("ip", "-n", router, "addr", "add", f"{public_ip}/24", "dev", "wan")
            # The LAN is a bridge in the router, so that more hosts can join it (`add_host`).
            _run("ip", "-n", router, "link", "add", "lan", "type", "bridge")
            _run("ip", "-n", router, "link", "set", "lan", "up")
            _run("ip", "-n", router, "addr", "add", f"{prefix}.1/24", "dev", "lan")
            self._join(host, host, 10)
            _run("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            if self.nats[host] != "open":
                _run("ip", "netns", "exec", router, "nft", "-f", "-",
                     stdin=_nat_rules(self.nats[host]))  # fmt: skip
        for host, (prefix, public_ip) in LANS.items():
            if self.nats[host] != "open":
                continue
            # Routed, not translated: the public side reaches the LAN through its router.
            others = [self.ns(f"nat_{h}") for h in LANS if h != host]
            for ns in [broker, *others]:
                _run("ip", "-n", ns, "route", "add", f"{prefix}.0/24", "via", public_ip)

    def _join(self, host: str, lan: str, number: int) -> None:
        """Make namespace ``host`` a host of ``lan``'s LAN at address prefix.``number``."""
        prefix, _ = LANS[lan]
        router, inside = self.ns(f"nat_{lan}"), self._add(host)
        self._veth(router, f"l-{host}", inside, "eth0")
        _run("ip", "-n", router, "link", "set", f"l-{host}", "master", "lan")
        _run("ip", "-n", inside, "addr", "add", f"{prefix}.{number}/24", "dev", "eth0")
        _run("ip", "-n", inside, "route", "add", "default", "via", f"{prefix}.1")
        self.hosts[host] = f"{prefix}.{number}"

    def add_host(self, host: str, lan: str) -> str:
        """Another host on ``lan``'s LAN (behind the same NAT), e.g. ``add_host("a2", "a")``;
        its address."""
        self._join(host, lan, 10 + len([h for h in self.hosts if self.lan_of(h) == lan]))
        self.nats[host] = self.nats[lan]
        return self.hosts[host]

    def lan_of(self, host: str) -> str:
        """The LAN (``a`` or ``b``) ``host`` is on."""
        prefix = self.hosts[host].rpartition(".")[0]
        return next(lan for lan, (p, _) in LANS.items() if p == prefix)

    def add_uplink(self, host: str, address: str, *, reach: Sequence[str] = ()) -> None:
        """A second interface ``eth1`` on ``host`` with public ``address`` (203.0.113.x, a
        /32), straight onto the public segment: a multi-homed host. Only traffic to the
        addresses in ``reach`` leaves through it (the rest keeps the LAN's default route);
        with none, the link is down on the public side: an interface that is up on the host
        but leads nowhere."""
        public, inside = self.ns("public"), self.ns(host)
        self._veth(public, f"u-{host}", inside, "eth1")
        _run("ip", "-n", inside, "addr", "add", f"{address}/32", "dev", "eth1")
        if not reach:
            _run("ip", "-n", public, "link", "set", f"u-{host}", "down")
            return
        _run("ip", "-n", public, "link", "set", f"u-{host}", "master", "br0")
        for target in reach:
            _run("ip", "-n", inside, "route", "add", f"{target}/32", "dev", "eth1",
                 "src", address)  # fmt: skip

    def limit(self, host: str, interface: str, rate: str) -> None:
        """Shape what ``host`` sends out of ``interface`` to ``rate`` (tbf, e.g. "40mbit")."""
        _run("ip", "netns", "exec", self.ns(host), "tc", "qdisc", "add", "dev", interface,
             "root", "tbf", "rate", rate, "burst", "64kb", "latency", "200ms")  # fmt: skip

    def sent_bytes(self, host: str, interface: str) -> int:
        """Bytes ``host`` has sent out of ``interface`` so far."""
        out = subprocess.run(
            ["ip", "-n", self.ns(host), "-s", "-j", "link", "show", "dev", interface],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return int(json.loads(out.stdout)[0]["stats64"]["tx"]["bytes"])

    def cut(self, host: str, interface: str) -> None:
        """Take ``host``'s ``interface`` down (its routes go with it): a path dies."""
        _run("ip", "-n", self.ns(host), "link", "set", interface, "down")

    def teardown(self) -> None:
        """Delete every namespace (their links and rules go with them)."""
        for name in reversed(self.names):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        self.names.clear()


def lab_namespaces(tag: str = "") -> list[str]:
    """The lab namespaces that exist now (of one lab, given its tag)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    names = [line.split()[0] for line in out.stdout.splitlines() if line.strip()]
    return [n for n in names if n.startswith(f"fl{tag}")]


@contextlib.contextmanager
def lab(nat_a: NatKind = "cone", nat_b: NatKind = "cone") -> Iterator[Lab]:
    """Build a lab with these NATs in front of `a` and `b`; tear it down after the block."""
    ensure_tools()
    built = Lab(secrets.token_hex(3), {"a": nat_a, "b": nat_b})
    try:
        built.build()
        yield built
    finally:
        built.teardown()


def main(argv: Sequence[str] | None = None) -> None:
    """``sudo python -m tests.support.netlab [--nat-a KIND] [--nat-b KIND]``: build a lab,
    print how to use it, hold it until Enter (or Ctrl-C), tear it down."""
    import argparse

    kinds = ["cone", "reset", "symmetric", "open"]
    parser = argparse.ArgumentParser(description="Build a network lab for trying Ferry by hand.")
    parser.add_argument("--nat-a", choices=kinds, default="cone")
    parser.add_argument("--nat-b", choices=kinds, default="cone")
    ns = parser.parse_args(argv)
    with lab(ns.nat_a, ns.nat_b) as net:
        print(f"lab {net.tag}: broker {BROKER_IP}, a {net.ip('a')} ({ns.nat_a}), "
              f"b {net.ip('b')} ({ns.nat_b})")  # fmt: skip
        for host in ("broker", "a", "b"):
            print(f"  {host:<6} ip netns exec {net.ns(host)} ...")
        print(f"e.g. ip netns exec {net.ns('broker')} ferry serve --listen {BROKER_IP}:50051 "
              "--insecure-plaintext")  # fmt: skip
        print(f"     ip netns exec {net.ns('a')} env FERRY_BROKER=grpc://{BROKER_IP}:50051 "
              "FERRY_INSECURE_PLAINTEXT=1 ferry send FILE")  # fmt: skip
        with contextlib.suppress(KeyboardInterrupt, EOFError):
            input("Enter tears the lab down. ")


if __name__ == "__main__":
    main()
