"""Real `ferry` processes in the network lab (tests/support/netlab.py): the harness the NAT
tests of issue 11 build on.

The broker runs on the lab's public segment (203.0.113.10, plaintext on purpose: the lab has
no route out), the sender on host `a` and the receiver on host `b`. With no NAT between
them (routed LANs) the receiver reaches the sender's host candidate and the file moves
directly.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.files import random_file, sha256
from tests.support.netlab import BROKER_IP, lab
from tests.support.processes import FAST_BROKER, BrokerProcess, FerryProcess

pytestmark = [pytest.mark.timeout(90)]


def test_a_direct_transfer_between_two_routed_lans(tmp_path: Path) -> None:
    src = random_file(tmp_path / "src" / "lab.bin", 3 << 20)
    with lab(nat_a="open", nat_b="open") as net:
        broker = BrokerProcess(
            data_dir=tmp_path / "data",
            args=[*FAST_BROKER, "--insecure-plaintext"],
            listen=f"{BROKER_IP}:0",
            prefix=net.command("broker", []),
        )
        broker.start()
        env = {
            **os.environ,
            "FERRY_BROKER": f"grpc://{broker.address}",
            "FERRY_INSECURE_PLAINTEXT": "1",
            "XDG_STATE_HOME": str(tmp_path / "state"),
        }
        sender = FerryProcess(
            ["send", str(src), "--json"], env, tmp_path, prefix=net.command("a", [])
        ).start()
        receiver: FerryProcess | None = None
        try:
            offered = sender.line()
            assert offered["event"] == "offered", offered
            dest = tmp_path / "dest"
            receiver = FerryProcess(
                ["receive", offered["code"], "--dest", str(dest), "--yes", "--json"],
                {**env, "XDG_STATE_HOME": str(tmp_path / "state-b")},
                tmp_path,
                prefix=net.command("b", []),
            ).start()
            rc, lines, err = receiver.finish(60)
            assert rc == 0, err
            done = lines[-1]
            assert done["event"] == "completed", lines
            assert done["path"] == "direct", done
            assert sha256(dest / "lab.bin") == sha256(src)
            src_rc, _, src_err = sender.finish(30)
            assert src_rc == 0, src_err
        finally:
            sender.kill()
            if receiver is not None:
                receiver.kill()
            broker.kill()
