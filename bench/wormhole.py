"""Ferry against magic-wormhole on the same file, in one run.

    python bench/wormhole.py [--size MiB] [--runs N] [--venv DIR] [--dir DIR]

magic-wormhole lives in the bench's own virtualenv, never in the project's environment:
by default ``~/.cache/ferry-bench/venv-wormhole`` (or ``$FERRY_BENCH_WORMHOLE_VENV``),
created on first use with ``python3 -m venv`` and ``pip install magic-wormhole
magic-wormhole-mailbox-server magic-wormhole-transit-relay``.

Each run starts nothing new but the two transfers: a wormhole mailbox server
(``twist wormhole-mailbox``) and a transit relay (``twist transitrelay``) listen on
127.0.0.1 for the whole run, as does a Ferry broker. Per run, the same random file
(default 1 GiB) is moved with ``wormhole send`` / ``wormhole receive --accept-file`` and
with real ``ferry send`` / ``ferry receive`` processes (bench/transfer.py's ferry_copy),
alternating, and each copy is checked byte for byte.

Rates (MB/s = 10^6 bytes/s):
- *data*: Ferry's from the receiver's completion line (acceptance to the last file
  verified, fsynced and in place); wormhole's from its receiver's ``Receiving (...)`` line
  (transit connection up) to the process's exit (wormhole does not fsync).
- *wall*: the whole receive command, process start to exit, for both.

Wormhole's receiver says which way its bytes went: ``->tcp:HOST:PORT`` is direct,
``->relay:tcp:...`` went through the transit relay; every run prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.baseline_copy import make_random_file
from bench.transfer import ferry_copy, start_broker

MIB = 1 << 20
HOST = "127.0.0.1"
PACKAGES = ("magic-wormhole", "magic-wormhole-mailbox-server", "magic-wormhole-transit-relay")
DEFAULT_VENV = Path(
    os.environ.get("FERRY_BENCH_WORMHOLE_VENV")
    or Path.home() / ".cache" / "ferry-bench" / "venv-wormhole"
)


def ensure_venv(venv: Path) -> Path:
    """The venv's bin folder, creating the venv and installing wormhole if needed."""
    bindir = venv / "bin"
    if (bindir / "wormhole").exists() and (bindir / "twist").exists():
        return bindir
    print(f"creating {venv} with {', '.join(PACKAGES)} ...", flush=True)
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([str(bindir / "pip"), "install", "--quiet", *PACKAGES], check=True, timeout=900)
    return bindir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def loopback_netns() -> Iterator[list[str]]:
    """A network namespace with only `lo` up; yields the command prefix that runs in it.

    magic-wormhole offers its peer every interface address it finds and has no option to
    offer fewer, so it runs where loopback is the only network there is.
    """
    name = f"ferry-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        prefix = ["ip", "netns", "exec", name]
        subprocess.run([*prefix, "ip", "link", "set", "lo", "up"], check=True, timeout=30)
        yield prefix
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, timeout=30)


def _wait_listening(prefix: list[str], port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    probe = f"import socket; socket.create_connection(('{HOST}', {port}), timeout=1).close()"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        check = [*prefix, sys.executable, "-c", probe]
        if subprocess.run(check, capture_output=True, timeout=10, check=False).returncode == 0:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not listen on {HOST}:{port} within 30 s")


def _stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class Servers:
    """Where wormhole clients find the local mailbox server and transit relay."""

    bindir: Path
    relay_url: str
    transit_helper: str
    prefix: list[str]  # runs a command in the loopback-only network namespace

    def wormhole(self, *args: str) -> list[str]:
        return [
            *self.prefix,
            str(self.bindir / "wormhole"),
            "--relay-url",
            self.relay_url,
            "--transit-helper",
            self.transit_helper,
            *args,
        ]


@contextlib.contextmanager
def wormhole_servers(bindir: Path, workdir: Path) -> Iterator[Servers]:
    """A mailbox server and a transit relay on 127.0.0.1 of a loopback-only network
    namespace, stopped on exit; wormhole clients run there too (Servers.wormhole)."""
    workdir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as stack:
        prefix = stack.enter_context(loopback_netns())
        yield from _serve(bindir, workdir, prefix, procs)


def _serve(
    bindir: Path, workdir: Path, prefix: list[str], procs: list[subprocess.Popen[bytes]]
) -> Iterator[Servers]:
    try:
        ports = []
        for plugin in ("wormhole-mailbox", "transitrelay"):
            port = _free_port()
            log = (workdir / f"{plugin}.log").open("wb")
            with log:
                procs.append(
                    subprocess.Popen(
                        [
                            *prefix,
                            str(bindir / "twist"),
                            plugin,
                            f"--port=tcp:{port}:interface={HOST}",
                        ],
                        cwd=workdir,  # the mailbox's relay.sqlite goes here
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
            _wait_listening(prefix, port, procs[-1], plugin)
            ports.append(port)
        yield Servers(bindir, f"ws://{HOST}:{ports[0]}/v1", f"tcp:{HOST}:{ports[1]}", prefix)
    finally:
        for proc in procs:
            _stop(proc)


class _Lines:
    """Reads a stream in a thread, keeping each line with the time it arrived."""

    def __init__(self, stream: object) -> None:
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: object) -> None:
        assert hasattr(stream, "readline")
        while line := stream.readline():
            with self._cond:
                self.lines.append((time.perf_counter(), line.rstrip("\n")))
                self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> tuple[float, re.Match[str]]:
        """The first line matching ``pattern`` (time, match), waiting up to ``timeout``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for at, line in self.lines:
                    if m := regex.search(line):
                        return at, m
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    text = "\n".join(line for _, line in self.lines[-10:])
                    raise RuntimeError(f"no line matching {pattern!r}; last lines:\n{text}")
                self._cond.wait(min(left, 0.5))

    def join(self, timeout: float = 10) -> None:
        self._thread.join(timeout)


@contextlib.contextmanager
def wormhole_sender(servers: Servers, src: Path) -> Iterator[str]:
    """A `wormhole send` process waiting for its receiver; yields the code."""
    sender = subprocess.Popen(
        servers.wormhole("send", "--hide-progress", "--no-qr", str(src)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = _Lines(sender.stderr)
        _, m = lines.wait_for(r"Wormhole code is: (\S+)", 60)
        yield m.group(1)
        if sender.wait(timeout=120) != 0:
            text = "\n".join(line for _, line in lines.lines[-10:])
            raise RuntimeError(f"wormhole send failed: {text}")
    finally:
        _stop(sender)


@dataclass(frozen=True)
class WormholeReceive:
    wall: float  # receive process start to exit
    data: float  # "Receiving (...)" line to exit
    to_done: float  # process start to the "Received file written to" line
    route: str  # e.g. "->tcp:10.0.0.5:41234" (direct) or "->relay:tcp:127.0.0.1:..."

    @property
    def direct(self) -> bool:
        return "relay:" not in self.route


def wormhole_receive(servers: Servers, code: str, dest: Path, timeout: float) -> WormholeReceive:
    """Run `wormhole receive --accept-file CODE` into folder ``dest`` and time it."""
    dest.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    proc = subprocess.Popen(
        servers.wormhole("receive", "--accept-file", "--hide-progress", "-o", str(dest), code),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = _Lines(proc.stderr)
        rc = proc.wait(timeout=timeout)
        ended = time.perf_counter()
        lines.join()
        if rc != 0:
            text = "\n".join(line for _, line in lines.lines[-10:])
            raise RuntimeError(f"wormhole receive exited with {rc}: {text}")
        at, m = lines.wait_for(r"Receiving \((.*)\)\.\.", 0)
        done_at, _ = lines.wait_for(r"Received file written to", 0)
    finally:
        _stop(proc)
    return WormholeReceive(ended - started, ended - at, done_at - started, m.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="file size in MiB (default 1024)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each (default 3)")
    parser.add_argument("--chunk-size", type=int, default=1 << 20)
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="wormhole's virtualenv")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the files")
    ns = parser.parse_args()
    if ns.size <= 0 or ns.runs <= 0:
        parser.error("--size and --runs must be positive")
    size = ns.size * MIB
    bindir = ensure_venv(ns.venv)
    rates: dict[str, list[float]] = {
        "ferry data": [],
        "wormhole data": [],
        "ferry wall": [],
        "wormhole wall": [],
    }
    routes: list[str] = []
    with tempfile.TemporaryDirectory(dir=ns.dir, prefix="ferry-bench-wormhole-") as tmp:
        root = Path(tmp)
        src = root / "src.bin"
        make_random_file(src, size)
        broker, address = start_broker(root / "broker")
        try:
            with wormhole_servers(bindir, root / "wormhole-servers") as servers:
                for run in range(ns.runs):
                    dest = root / f"wormhole-{run}"
                    with wormhole_sender(servers, src) as code:
                        got = wormhole_receive(servers, code, dest, timeout=900)
                    if not filecmp.cmp(src, dest / src.name, shallow=False):
                        raise RuntimeError("wormhole's copy differs from the source")
                    shutil.rmtree(dest)
                    routes.append(got.route)
                    rates["wormhole data"].append(size / got.data / 1e6)
                    rates["wormhole wall"].append(size / got.wall / 1e6)

                    dest = root / f"ferry-{run}"
                    seconds, wall = ferry_copy(src, dest, address, ns.chunk_size)
                    if not filecmp.cmp(src, dest / src.name, shallow=False):
                        raise RuntimeError("ferry's copy differs from the source")
                    shutil.rmtree(dest)
                    rates["ferry data"].append(size / seconds / 1e6)
                    rates["ferry wall"].append(size / wall / 1e6)
                    print(
                        f"run {run + 1}: "
                        + "  ".join(f"{k} {v[-1]:,.0f}" for k, v in rates.items())
                        + f" MB/s; wormhole went {got.route}"
                        + (" (direct)" if got.direct else " (VIA RELAY)"),
                        flush=True,
                    )
        finally:
            broker.terminate()
            broker.wait(timeout=15)
    med = {k: statistics.median(v) for k, v in rates.items()}
    direct = sum("relay:" not in r for r in routes)
    print(f"\n{ns.size} MiB, {ns.runs} runs, medians (MB/s = 10^6 bytes/s):")
    for k, v in med.items():
        print(f"  {k:14s} {v:8,.0f} MB/s")
    print(f"  ferry / wormhole (data)  {med['ferry data'] / med['wormhole data']:.2f}x  (aim >= 3)")
    print(f"  ferry / wormhole (wall)  {med['ferry wall'] / med['wormhole wall']:.2f}x")
    print(f"  wormhole went direct in {direct} of {len(routes)} runs: {sorted(set(routes))}")


if __name__ == "__main__":
    main()
