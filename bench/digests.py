"""Single-thread digest throughput on 256 MiB of random data held in memory.

    python bench/digests.py [--size MiB] [--runs N]

Measures blake3 (one-shot and incremental 1 MiB updates), hashlib.sha256 and
hashlib.blake2b; prints MB/s (10**6 bytes per second, median of --runs) and the
ratio to sha256 measured in the same run. Single-core hashing is stable to about
±2% on the shared machines, so the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import time
from collections.abc import Callable

import blake3

MIB = 1 << 20
CHUNK = MIB


def _blake3_oneshot(data: memoryview) -> bytes:
    return blake3.blake3(data).digest()


def _blake3_incremental(data: memoryview) -> bytes:
    hasher = blake3.blake3()
    for offset in range(0, len(data), CHUNK):
        hasher.update(data[offset : offset + CHUNK])
    return hasher.digest()


def _hashlib(name: str) -> Callable[[memoryview], bytes]:
    def digest(data: memoryview) -> bytes:
        hasher = hashlib.new(name)
        for offset in range(0, len(data), CHUNK):
            hasher.update(data[offset : offset + CHUNK])
        return hasher.digest()

    return digest


CANDIDATES: dict[str, Callable[[memoryview], bytes]] = {
    "sha256": _hashlib("sha256"),
    "blake2b": _hashlib("blake2b"),
    "blake3 (one-shot)": _blake3_oneshot,
    "blake3 (1 MiB updates)": _blake3_incremental,
}


def measure(fn: Callable[[memoryview], bytes], data: memoryview, runs: int) -> float:
    """Median throughput of ``fn`` over ``data`` in MB/s."""
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(data)
        rates.append(len(data) / (time.perf_counter() - start) / 1e6)
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="MiB of data (default 256)")
    parser.add_argument("--runs", type=int, default=5, help="runs per digest (default 5)")
    ns = parser.parse_args()

    data = memoryview(os.urandom(ns.size * MIB))
    # blake3's one-shot call must stay single-threaded (no max_threads), like the others.
    assert _blake3_oneshot(data) == _blake3_incremental(data)

    print(f"{ns.size} MiB random data in memory, one thread, median of {ns.runs} runs")
    rates = {name: measure(fn, data, ns.runs) for name, fn in CANDIDATES.items()}
    base = rates["sha256"]
    width = max(len(name) for name in rates)
    for name, rate in rates.items():
        print(f"  {name:<{width}}  {rate:9,.0f} MB/s  {rate / base:5.2f}x sha256")


if __name__ == "__main__":
    main()
