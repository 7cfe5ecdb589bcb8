"""Ferry's direct path against a bare TLS copy and a plain TCP copy, in one run.

    python bench/transfer.py [--size MiB] [--runs N] [--chunk-size BYTES] [--dir DIR]

Makes a random file (default 1 GiB), starts a real broker (`ferry serve`) on loopback and,
for each run, moves the file with real `ferry send` / `ferry receive --json` processes,
then with `tls_copy` (blocking ssl sockets, fsync at the end) and `tcp_copy`
(bench/_baselines.py), alternating so the shared machine's noise hits all alike.

Ferry's rate is taken from the receiver's completion line: from acceptance to the last
file verified, fsynced and moved into place (the baselines are timed from connect to
fsync). The wall time of the whole `ferry receive` command (process start, imports,
claim, consent, transfer) is printed too. Every Ferry copy is checked byte for byte.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._baselines import tcp_copy, tls_copy
from bench.baseline_copy import make_random_file

MIB = 1 << 20


def _line(proc: subprocess.Popen[str], what: str) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{what} exited with {proc.wait()} before printing a line")
    value = json.loads(line)
    assert isinstance(value, dict)
    return value


def start_broker(
    data_dir: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], str]:
    """A real broker on 127.0.0.1, port chosen by the OS."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ferry.broker",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(data_dir),
            "--log-level",
            "WARNING",
            *args,
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    return proc, str(_line(proc, "broker")["address"])


FERRY = [sys.executable, "-m", "ferry.cli"]


def ferry_env(broker: str, **extra: str) -> dict[str, str]:
    """The environment for a `ferry` process talking to ``broker``, on loopback only."""
    return {**os.environ, "FERRY_BROKER": broker, "FERRY_ADDRESSES": "127.0.0.1", **extra}


def start_sender(
    src: Path, env: dict[str, str], chunk_size: int = 1 << 20
) -> tuple[subprocess.Popen[str], str]:
    """A real `ferry send --json` process and the code from its first line.

    The sender waits for the receiver's consent from then on; the caller must end it.
    """
    sender = subprocess.Popen(
        [*FERRY, "send", str(src), "--json", "--chunk-size", str(chunk_size)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        return sender, str(_line(sender, "ferry send")["code"])
    except BaseException:
        sender.kill()
        sender.wait()
        raise


def receive_args(code: str, dest: Path) -> list[str]:
    """The command line of `ferry receive --json` into folder ``dest``."""
    return [*FERRY, "receive", code, "--dest", str(dest), "--yes", "--json"]


def ferry_copy(src: Path, dest: Path, broker: str, chunk_size: int) -> tuple[float, float]:
    """Move ``src`` into folder ``dest`` with real CLI processes.

    Returns (data-path seconds reported by the receiver, wall seconds of `ferry receive`).
    """
    env = ferry_env(broker)
    sender, code = start_sender(src, env, chunk_size)
    try:
        started = time.perf_counter()
        done = subprocess.run(
            receive_args(code, dest),
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
            check=False,
        )
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"ferry receive failed: {done.stderr.strip()}")
        last = json.loads(done.stdout.splitlines()[-1])
        if sender.wait(timeout=60) != 0:
            raise RuntimeError("ferry send failed")
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    return float(last["seconds"]), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="file size in MiB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=1 << 20)
    parser.add_argument("--streams", type=int, default=0, help="broker's stream count")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the files")
    ns = parser.parse_args()
    size = ns.size * MIB
    with tempfile.TemporaryDirectory(dir=ns.dir, prefix="ferry-bench-") as tmp:
        root = Path(tmp)
        src = root / "src.bin"
        make_random_file(src, size)
        extra = ["--stream-count", str(ns.streams)] if ns.streams else []
        broker, address = start_broker(root / "broker", *extra)
        rates: dict[str, list[float]] = {"ferry": [], "ferry (wall)": [], "tls": [], "tcp": []}
        try:
            tls_copy(src, root / "warm.bin")  # warm the page cache and the TLS code
            (root / "warm.bin").unlink()
            for run in range(ns.runs):
                dest = root / f"ferry-{run}"
                seconds, wall = ferry_copy(src, dest, address, ns.chunk_size)
                if not filecmp.cmp(src, dest / src.name, shallow=False):
                    raise RuntimeError("ferry's copy differs from the source")
                shutil.rmtree(dest)
                rates["ferry"].append(size / seconds / 1e6)
                rates["ferry (wall)"].append(size / wall / 1e6)
                for name, copy in (("tls", tls_copy), ("tcp", tcp_copy)):
                    dst = root / f"{name}.bin"
                    rates[name].append(size / copy(src, dst) / 1e6)
                    dst.unlink()
                print(
                    f"run {run + 1}: "
                    + "  ".join(f"{k} {v[-1]:,.0f} MB/s" for k, v in rates.items()),
                    flush=True,
                )
        finally:
            broker.terminate()
            broker.wait(timeout=15)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\n{ns.size} MiB, {ns.runs} runs, medians (MB/s = 10^6 bytes/s):")
    for k, v in med.items():
        print(f"  {k:13s} {v:8,.0f} MB/s")
    # Each run's ratio pairs measurements taken seconds apart: steadier on a noisy machine.
    for name, num, den in (
        ("ferry / tls copy", "ferry", "tls"),
        ("ferry / tcp copy", "ferry", "tcp"),
        ("ferry wall / tls", "ferry (wall)", "tls"),
    ):
        per_run = [a / b for a, b in zip(rates[num], rates[den], strict=True)]
        print(
            f"  {name:18s} {med[num] / med[den]:.2f} (ratio of medians); "
            f"per run {statistics.median(per_run):.2f} median, "
            f"{min(per_run):.2f}-{max(per_run):.2f}"
        )


if __name__ == "__main__":
    main()
