"""Two broker replicas on one store, behind one address: a transfer whose replica goes away.

`finish_on_the_other` is the scenario that the replica tests share (tests/integration/
test_replicas.py: SIGKILL; tests/integration/broker/test_operations.py: a SIGTERM drain).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.support.files import sha256
from tests.support.processes import BrokerProcess, FerryProcess, cli_env
from tests.support.tap import TcpTap


def finish_on_the_other(
    tmp_path: Path, a: BrokerProcess, b: BrokerProcess, src: Path, take_down: Callable[[], None]
) -> list[dict[str, object]]:
    """Behind one address (a TCP relay standing in for a Kubernetes Service) that reaches
    replica `a`: offer `src`, then `take_down()` replica `a` and point the address at `b`;
    the receiver, through the same address, must get the file and the sender must finish.
    Returns the sender's JSON lines. Kills everything it started, and both replicas."""
    with TcpTap(a.address) as service:
        sender = FerryProcess(
            ["send", str(src), "--json"], cli_env(tmp_path, service.address, "s"), tmp_path
        )
        receiver: FerryProcess | None = None
        try:
            sender.start()
            offered = sender.line()  # the offer is in the store; `a` holds the sender's watch
            host, _, port = b.address.rpartition(":")
            service.upstream = (host, int(port))  # new connections reach only `b`
            take_down()
            receiver = FerryProcess(
                ["receive", str(offered["code"]), "--dest", str(tmp_path / "dest"), "--yes",
                 "--json"],
                cli_env(tmp_path, service.address, "r"),
                tmp_path,
            ).start()  # fmt: skip
            rc, lines, err = receiver.finish(60)
            assert rc == 0, err
            assert lines[-1]["event"] == "completed", lines
            assert sha256(tmp_path / "dest" / src.name) == sha256(src)
            src_rc, src_lines, src_err = sender.finish(30)
            assert src_rc == 0, src_err
            return src_lines
        finally:
            sender.kill()
            if receiver is not None:
                receiver.kill()
            a.kill()
            b.kill()
