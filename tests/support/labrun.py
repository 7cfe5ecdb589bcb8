"""Real `ferry send` / `ferry receive` runs in the network lab (tests/support/netlab.py).

`lab_broker(net, tmp_path)` starts a broker (plaintext on purpose: the lab has no route out)
on the lab's public segment, with a moto S3 server beside it if asked; `LabBroker.transfer`
runs a sender on one lab host and a receiver on another and returns both sides' JSON lines.
Used by the NAT tests and by bench/nat.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.netlab import BROKER_IP, Lab
from tests.support.processes import FAST_BROKER, BrokerProcess, FerryProcess
from tests.support.s3 import S3Server

__all__ = ["LabBroker", "Outcome", "lab_broker"]


@dataclass
class Outcome:
    """How a lab transfer ended, on both sides."""

    rc: int
    lines: list[dict[str, Any]]
    err: str
    sender_rc: int | None
    sender_lines: list[dict[str, Any]]
    sender_err: str
    seconds: float
    #: Seconds from the receiver's start to its first progress line with bytes (or None).
    first_bytes: float | None = None

    @property
    def done(self) -> dict[str, Any]:
        """The receiver's completed line (AssertionError with its output if it has none)."""
        assert self.rc == 0, f"receiver failed ({self.rc}): {self.err[-3000:]}"
        last = self.lines[-1] if self.lines else {}
        assert last.get("event") == "completed", self.lines[-5:]
        return last


@dataclass
class LabBroker:
    net: Lab
    tmp: Path
    broker: BrokerProcess
    s3: S3Server | None = None
    env: dict[str, str] = field(default_factory=dict)

    def transfer(
        self,
        src: Path,
        dest: Path,
        *,
        sender: str = "a",
        receiver: str = "b",
        env: dict[str, str] | None = None,
        receiver_args: Sequence[str] = (),
        sender_args: Sequence[str] = (),
        during: Callable[[FerryProcess, FerryProcess], None] | None = None,
        timeout: float = 60,
    ) -> Outcome:
        """``ferry send SRC`` on host ``sender``, ``ferry receive CODE --dest DEST`` on host
        ``receiver``; ``during(sender, receiver)`` runs once both are started."""
        base = {**self.env, **(env or {})}
        send = FerryProcess(
            ["send", str(src), "--json", *sender_args],
            {**base, "XDG_STATE_HOME": str(self.tmp / f"state-{sender}")},
            self.tmp,
            prefix=self.net.command(sender, []),
        ).start()
        recv: FerryProcess | None = None
        try:
            offered = send.line()
            assert offered["event"] == "offered", offered
            started = time.monotonic()
            recv = FerryProcess(
                ["receive", offered["code"], "--dest", str(dest), "--yes", "--json",
                 *receiver_args],
                {**base, "XDG_STATE_HOME": str(self.tmp / f"state-{receiver}")},
                self.tmp,
                prefix=self.net.command(receiver, []),
            ).start()  # fmt: skip
            if during is not None:
                during(send, recv)
            rc, lines, err = recv.finish(timeout)
            seconds = time.monotonic() - started
            sender_rc: int | None = None
            sender_lines: list[dict[str, Any]] = []
            sender_err = ""
            if rc == 0:  # else the sender waits for the receiver's rerun: it is killed
                sender_rc, sender_lines, sender_err = send.finish(30)
        finally:
            send.kill()
            if recv is not None:
                recv.kill()
        return Outcome(rc, lines, err, sender_rc, sender_lines, sender_err, seconds)


def lab_env(broker: BrokerProcess) -> dict[str, str]:
    """The clients' environment: this broker, and every interface of their lab host as
    candidates (the test suite keeps other clients to 127.0.0.1, FERRY_ADDRESSES)."""
    env = {
        **os.environ,
        "FERRY_BROKER": f"grpc://{broker.address}",
        "FERRY_INSECURE_PLAINTEXT": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("FERRY_ADDRESSES", None)
    return env


@contextlib.contextmanager
def lab_broker(
    net: Lab, tmp: Path, *, s3: bool = False, args: Sequence[str] = ()
) -> Iterator[LabBroker]:
    """A broker on the lab's broker host (and moto beside it with ``s3``)."""
    server: S3Server | None = None
    extra: list[str] = []
    if s3:
        server = S3Server(
            tmp / "moto.log", host=BROKER_IP, prefix=net.command("broker", [])
        ).start()
        extra = server.broker_args()
    broker = BrokerProcess(
        data_dir=tmp / "data",
        args=[*FAST_BROKER, "--insecure-plaintext", *extra, *args],
        listen=f"{BROKER_IP}:0",
        prefix=net.command("broker", []),
        env=server.env if server is not None else None,
    )
    try:
        broker.start()
        yield LabBroker(net, tmp, broker, server, lab_env(broker))
    finally:
        broker.kill()
        if server is not None:
            server.stop()


def pause(proc: FerryProcess, seconds: float) -> None:
    """Stop ``proc`` for ``seconds`` (SIGSTOP, SIGCONT): a peer that is late. (`ip netns
    exec` execs its command: the pid is the ferry process's own.)"""
    assert proc.proc is not None
    os.kill(proc.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(proc.proc.pid, signal.SIGCONT)
