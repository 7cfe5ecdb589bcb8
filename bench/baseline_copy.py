"""Rates of the bare TLS and TCP loopback file copies that Ferry is compared with.

    python bench/baseline_copy.py [--size MiB] [--runs N] [--warmup N] [--dir DIR]

Makes a random file (default 1 GiB) in a temporary directory, then copies it with
``tls_copy`` and ``tcp_copy`` (bench/_baselines.py) --runs times each, alternating so
that the shared machine's noise hits both alike, and prints each run and the medians
in MB/s (10**6 bytes per second, connect to fsync done).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

# Run as a script (python bench/baseline_copy.py): make `bench` importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._baselines import tcp_copy, tls_copy

MIB = 1 << 20


def make_random_file(path: Path, size: int) -> None:
    """Write ``size`` random bytes to ``path`` (in 64 MiB pieces) and fsync it."""
    with path.open("wb") as f:
        left = size
        while left:
            piece = os.urandom(min(left, 64 * MIB))
            f.write(piece)
            left -= len(piece)
        f.flush()
        os.fsync(f.fileno())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="file size in MiB (default 1024)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each copy (default 3)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed runs of each copy first (default 1)"
    )
    parser.add_argument("--dir", type=Path, default=None, help="where to put the files")
    ns = parser.parse_args()
    if ns.size <= 0 or ns.runs <= 0 or ns.warmup < 0:
        parser.error("--size and --runs must be positive, --warmup not negative")

    copies: dict[str, Callable[[Path, Path], float]] = {"tls_copy": tls_copy, "tcp_copy": tcp_copy}
    rates: dict[str, list[float]] = {name: [] for name in copies}
    with tempfile.TemporaryDirectory(prefix="ferry-baseline-", dir=ns.dir) as tmp:
        src, dst = Path(tmp) / "src.bin", Path(tmp) / "dst.bin"
        size = ns.size * MIB
        make_random_file(src, size)
        print(f"{ns.size} MiB random file in {tmp}; median of {ns.runs} runs; 127.0.0.1")
        # The first copies after writing the source run slow (disk writeback, cold
        # caches); untimed warm-up runs keep that out of the medians.
        for _ in range(ns.warmup):
            for copy in copies.values():
                copy(src, dst)
                dst.unlink()
        for run in range(1, ns.runs + 1):
            for name, copy in copies.items():
                seconds = copy(src, dst)
                dst.unlink()
                rates[name].append(size / seconds / 1e6)
                print(f"  run {run}  {name}  {rates[name][-1]:8,.0f} MB/s  ({seconds:.2f} s)")

    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, rate in medians.items():
        print(f"{name}: {rate:,.0f} MB/s (median)")
    print(f"tls_copy / tcp_copy: {medians['tls_copy'] / medians['tcp_copy']:.2f}")


if __name__ == "__main__":
    main()
