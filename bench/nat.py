"""Connection set-up through NATs, in the network lab: how long from acceptance to the first
verified chunk, per scenario, against the same on loopback.

    sudo python bench/nat.py [--runs N] [--size BYTES] [--connect-timeout S]

Each run builds a fresh lab (tests/support/netlab.py: namespaces, veth pairs, nftables NAT
routers; about 0.1 s), starts a broker (and, for the scenarios that need it, a moto S3
server) on the lab's public segment, and runs a real `ferry send` on one host and `ferry
receive --json` on another. The receiver reports ``first_chunk_seconds`` (acceptance to the
first verified chunk, whatever the path), ``route`` and the checks' ``tries``. Scenarios:

- ``loopback``: both peers and the broker on this machine's loopback (the baseline);
- ``same-lan``: two hosts on one LAN behind one NAT: host candidates;
- ``cone``: each peer behind its own drop-filtering NAT: punched;
- ``reset``: NATs that answer unsolicited SYNs with resets: punched, or the store;
- ``symmetric``: the receiver behind a port-randomising NAT: the store, after the plan's
  connect deadline (--connect-timeout, default 5 s here).

Prints one line per scenario: the median and the spread of first_chunk_seconds, the routes
seen, the median tries, and the ratio of the median to loopback's. Needs root (ip netns).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.files import random_file, sha256
from tests.support.labrun import lab_broker
from tests.support.netlab import NatKind, lab
from tests.support.processes import FAST_BROKER, BrokerProcess, FerryProcess

SCENARIOS = ("loopback", "same-lan", "cone", "reset", "symmetric")


def loopback_run(tmp: Path, src: Path, broker_args: list[str]) -> dict[str, Any]:
    """The same transfer on loopback, as the tests run it."""
    broker = BrokerProcess(data_dir=tmp / "data", args=[*FAST_BROKER, *broker_args])
    broker.start()
    env = {
        **os.environ,
        "FERRY_BROKER": broker.address,
        "FERRY_ADDRESSES": "127.0.0.1",
        "PYTHONUNBUFFERED": "1",
    }
    send = FerryProcess(["send", str(src), "--json"], {**env, "XDG_STATE_HOME": str(tmp / "s")},
                        tmp).start()  # fmt: skip
    recv: FerryProcess | None = None
    try:
        code = send.line()["code"]
        recv = FerryProcess(
            ["receive", code, "--dest", str(tmp / "dest"), "--yes", "--json"],
            {**env, "XDG_STATE_HOME": str(tmp / "r")},
            tmp,
        ).start()
        rc, lines, err = recv.finish(60)
        if rc != 0:
            raise RuntimeError(err)
        send.finish(30)
        return lines[-1]
    finally:
        send.kill()
        if recv is not None:
            recv.kill()
        broker.kill()


def lab_run(scenario: str, tmp: Path, src: Path, broker_args: list[str]) -> dict[str, Any]:
    nats: dict[str, tuple[NatKind, NatKind]] = {
        "same-lan": ("cone", "cone"),
        "cone": ("cone", "cone"),
        "reset": ("reset", "reset"),
        "symmetric": ("cone", "symmetric"),
    }
    store = scenario in ("reset", "symmetric")
    with lab(*nats[scenario]) as net, lab_broker(net, tmp, s3=store, args=broker_args) as run:
        receiver = "b"
        if scenario == "same-lan":
            net.add_host("a2", "a")
            receiver = "a2"
        out = run.transfer(src, tmp / "dest", receiver=receiver)
    done = out.done
    if sha256(tmp / "dest" / src.name) != sha256(src):
        raise RuntimeError(f"{scenario}: the file arrived different")
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size", type=int, default=1 << 20)
    parser.add_argument("--connect-timeout", type=float, default=5.0)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    ns = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/nat.py needs root (it builds network namespaces)")
    broker_args = ["--connect-timeout", str(ns.connect_timeout)]
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="ferry-nat-") as root:
        src = random_file(Path(root) / "src" / "nat.bin", ns.size)
        for scenario in ns.scenarios.split(","):
            for run in range(ns.runs):
                tmp = Path(root) / f"{scenario}-{run}"
                tmp.mkdir()
                if scenario == "loopback":
                    done = loopback_run(tmp, src, broker_args)
                else:
                    done = lab_run(scenario, tmp, src, broker_args)
                results.setdefault(scenario, []).append(done)
    base = statistics.median(float(d["first_chunk_seconds"]) for d in results["loopback"]) \
        if "loopback" in results else None  # fmt: skip
    print(f"{'scenario':<10} {'median s':>9} {'min-max s':>13} {'x loopback':>10} "
          f"{'tries':>6}  routes")  # fmt: skip
    for scenario, runs in results.items():
        times = [float(d["first_chunk_seconds"]) for d in runs]
        median = statistics.median(times)
        tries = statistics.median(int(d.get("connection", {}).get("tries", 0)) for d in runs)
        routes = Counter(str(d.get("route", d.get("path"))) for d in runs)
        ratio = f"{median / base:10.2f}" if base else f"{'-':>10}"
        print(f"{scenario:<10} {median:9.3f} {min(times):6.3f}-{max(times):6.3f} {ratio} "
              f"{tries:6.0f}  {dict(routes)}")  # fmt: skip


if __name__ == "__main__":
    main()
