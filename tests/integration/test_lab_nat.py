"""Through NATs, in the network lab: real `ferry` processes on hosts behind real NAT routers
(Linux masquerade and nftables in network namespaces, tests/support/netlab.py).

What each test shows:

- behind two drop-filtering ("cone") NATs the peers connect directly, by TCP simultaneous
  open from their data ports toward each other's reflexive candidates ("punched");
- behind a NAT that gives every connection a new public port ("symmetric") no pair works,
  and the transfer moves to the object store by itself, saying why; without a store it
  fails with a message that names the paths it tried;
- NATs that answer unsolicited SYNs with resets: direct when a punch wins within the
  bounded retries, else the store -- never a hang;
- a sender that goes quiet for seconds after the receiver accepted still gets connected;
- two hosts on one LAN use their host candidates;
- a sender with a second interface that leads nowhere still connects;
- a path that dies mid-transfer (the interface goes down) moves to another pair, keeping
  what was verified.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.files import random_file, sha256
from tests.support.labrun import lab_broker, pause
from tests.support.netlab import lab
from tests.support.processes import FerryProcess

pytestmark = [pytest.mark.timeout(120)]

MiB = 1 << 20


def test_two_cone_nats_connect_directly_by_punching(tmp_path: Path) -> None:
    src = random_file(tmp_path / "src" / "cone.bin", 4 * MiB)
    with lab(nat_a="cone", nat_b="cone") as net, lab_broker(net, tmp_path) as run:
        out = run.transfer(src, tmp_path / "dest")
    done = out.done
    assert done["path"] == "direct", done
    assert done["route"] == "punched", done
    # The pair that won: the receiver's LAN address, the sender's public one.
    assert done["connection"]["remote"].startswith(net.public_ip("a") + ":"), done
    assert sha256(tmp_path / "dest" / "cone.bin") == sha256(src)
    assert out.sender_rc == 0, out.sender_err
    # The sender learns the route from the receiver's report, through the broker.
    assert out.sender_lines[-1]["route"] == "punched", out.sender_lines[-1]


def test_a_symmetric_nat_falls_back_to_the_store_and_says_why(tmp_path: Path) -> None:
    src = random_file(tmp_path / "src" / "sym.bin", 2 * MiB)
    with (
        lab(nat_a="cone", nat_b="symmetric") as net,
        lab_broker(net, tmp_path, s3=True, args=["--connect-timeout", "4"]) as run,
    ):
        out = run.transfer(src, tmp_path / "dest")
    done = out.done
    assert done["path"] == "store", done
    assert done["route"] == "store", done
    assert "could not reach the sender directly" in done["connection"]["reason"], done
    assert done["connection"]["tries"] > 0, done
    assert sha256(tmp_path / "dest" / "sym.bin") == sha256(src)


def test_without_a_store_a_symmetric_nat_fails_naming_the_paths_tried(tmp_path: Path) -> None:
    src = random_file(tmp_path / "src" / "sym.bin", 1 * MiB)
    with (
        lab(nat_a="cone", nat_b="symmetric") as net,
        lab_broker(net, tmp_path, args=["--connect-timeout", "3"]) as run,
    ):
        out = run.transfer(
            src, tmp_path / "dest", receiver_args=["--stall-timeout", "4"], timeout=40
        )
    assert out.rc != 0, out.lines
    message = out.err.strip().splitlines()[-1]
    assert "could not reach the sender directly" in message, out.err
    assert net.public_ip("a") in message, message  # the sender's reflexive candidate
    assert not (tmp_path / "dest" / "sym.bin").exists()


def test_nats_that_reset_unsolicited_syns_end_direct_or_in_the_store(tmp_path: Path) -> None:
    src = random_file(tmp_path / "src" / "reset.bin", 2 * MiB)
    started = time.monotonic()
    with (
        lab(nat_a="reset", nat_b="reset") as net,
        lab_broker(net, tmp_path, s3=True, args=["--connect-timeout", "5"]) as run,
    ):
        out = run.transfer(src, tmp_path / "dest")
    done = out.done
    # A punch that wins is direct; one that does not reaches the store by the deadline.
    assert (done["path"], done["route"]) in {("direct", "punched"), ("store", "store")}, done
    assert sha256(tmp_path / "dest" / "reset.bin") == sha256(src)
    assert time.monotonic() - started < 60  # bounded: the deadline, then the store


def test_a_sender_that_is_late_still_connects(tmp_path: Path) -> None:
    src = random_file(tmp_path / "src" / "late.bin", 2 * MiB)

    def late_sender(sender: FerryProcess, receiver: FerryProcess) -> None:
        time.sleep(0.3)  # the receiver claims and accepts; the sender sleeps through it
        pause(sender, 4.0)

    with lab(nat_a="cone", nat_b="cone") as net, lab_broker(net, tmp_path) as run:
        out = run.transfer(src, tmp_path / "dest", during=late_sender)
    done = out.done
    assert done["route"] == "punched", done
    assert sha256(tmp_path / "dest" / "late.bin") == sha256(src)


def test_two_hosts_on_one_lan_use_their_host_candidates(tmp_path: Path) -> None:
    src = random_file(tmp_path / "src" / "lan.bin", 2 * MiB)
    with lab(nat_a="cone", nat_b="cone") as net, lab_broker(net, tmp_path) as run:
        neighbour = net.add_host("a2", "a")
        out = run.transfer(src, tmp_path / "dest", sender="a", receiver="a2")
    done = out.done
    assert done["route"] == "host", done
    assert done["connection"]["local"].startswith(neighbour + ":"), done
    assert done["connection"]["remote"].startswith(net.ip("a") + ":"), done
    assert sha256(tmp_path / "dest" / "lan.bin") == sha256(src)


def test_a_second_interface_that_leads_nowhere_does_not_stop_the_transfer(
    tmp_path: Path,
) -> None:
    src = random_file(tmp_path / "src" / "dead.bin", 2 * MiB)
    with lab(nat_a="cone", nat_b="cone") as net, lab_broker(net, tmp_path) as run:
        net.add_uplink("a", "203.0.113.20")  # up on `a`, dead beyond
        out = run.transfer(src, tmp_path / "dest")
    done = out.done
    assert done["route"] == "punched", done
    assert "203.0.113.20" not in done["connection"]["remote"], done
    assert sha256(tmp_path / "dest" / "dead.bin") == sha256(src)


def test_a_path_that_dies_mid_transfer_moves_to_another_pair(tmp_path: Path) -> None:
    src = random_file(tmp_path / "src" / "move.bin", 24 * MiB)

    moved_on_eth1: list[int] = []

    def cut_when_moving(sender: FerryProcess, receiver: FerryProcess) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and net.sent_bytes("a", "eth1") < 4 * MiB:
            time.sleep(0.05)  # until a few MiB went out on eth1
        moved_on_eth1.append(net.sent_bytes("a", "eth1"))
        net.cut("a", "eth1")

    with lab(nat_a="cone", nat_b="cone") as net, lab_broker(net, tmp_path) as run:
        # `a` reaches b's NAT on eth1 too (no NAT on that side): the first pair is the host
        # one, 203.0.113.20; the broker link stays on the LAN.
        net.add_uplink("a", "203.0.113.20", reach=[net.public_ip("b")])
        net.limit("a", "eth1", "40mbit")  # slow enough to be mid-transfer when it dies
        out = run.transfer(
            src,
            tmp_path / "dest",
            env={"FERRY_PATH_TIMEOUT": "2"},
            during=cut_when_moving,
            timeout=90,
        )
    done = out.done
    assert moved_on_eth1[0] >= 4 * MiB  # the first pair was the one through eth1
    assert done["path"] == "direct", done
    assert done["route"] == "punched", done  # the second pair: through nat_a
    assert net.public_ip("a") in done["connection"]["remote"], done
    assert sha256(tmp_path / "dest" / "move.bin") == sha256(src)
