"""Peak memory of `ferry send` and `ferry receive`: flat in the file's size?

    python bench/memory.py [--small MiB] [--large MiB] [--dir DIR]

Makes two random files on disk (default 100 MiB and 4 GiB, after checking the free space
for both plus the received copy), starts a real broker, and moves each with real
`ferry send` / `ferry receive --json` processes. Each process's peak RSS is the kernel's
high-water mark `VmHWM` in /proc/PID/status, read every 10 ms while it runs (it only grows,
so the last reading is the peak but for the last 10 ms). Not ``ru_maxrss``: on Linux that
keeps the high-water mark of the forked copy of this (much larger) bench process from before
the exec, which is what an earlier version measured. Prints both sides' peaks for both
sizes and the large/small ratio
(aim: ~1.0). Each copy is checked against its source's size and completion line, and
the larger is removed before the next is made.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.baseline_copy import make_random_file
from bench.transfer import ferry_env, receive_args, start_broker, start_sender

MIB = 1 << 20


def _hwm(pid: int) -> int:
    """The process's RSS high-water mark in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def wait_peaks(procs: list[subprocess.Popen[str]], timeout: float) -> list[int]:
    """Wait for every process to exit, reading each one's VmHWM until it does."""
    peaks = [0] * len(procs)
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline:
            raise TimeoutError(f"still running after {timeout} s")
        for i, proc in enumerate(procs):
            if proc.returncode is None:
                peaks[i] = max(peaks[i], _hwm(proc.pid))
        time.sleep(0.01)
    return peaks


def measure(src: Path, dest: Path, broker: str) -> tuple[int, int]:
    """(sender's peak RSS, receiver's peak RSS) of moving ``src`` into folder ``dest``."""
    env = ferry_env(broker)
    sender, code = start_sender(src, env)
    receiver: subprocess.Popen[str] | None = None
    out = dest.with_name(dest.name + ".out")
    try:
        with out.open("w") as f:  # a file, not a pipe: nothing to drain, waits stay bounded
            receiver = subprocess.Popen(receive_args(code, dest), stdout=f, text=True, env=env)
        assert sender.stdout is not None
        sender_peak, receiver_peak = wait_peaks([sender, receiver], 900)
        rc, sender_rc = receiver.returncode, sender.returncode
        sent = sender.stdout.read()
        if rc != 0 or sender_rc != 0:
            raise RuntimeError(f"ferry receive exited with {rc}, ferry send with {sender_rc}")
        for text in (out.read_text(), sent):
            last = json.loads(text.splitlines()[-1])
            if last.get("event") != "completed" or last["bytes"] != src.stat().st_size:
                raise RuntimeError(f"not a complete transfer: {last}")
        if (dest / src.name).stat().st_size != src.stat().st_size:
            raise RuntimeError("the copy has the wrong size")
    finally:
        for proc in (receiver, sender):
            if proc is not None and proc.returncode is None:
                proc.kill()
                proc.wait()
    return sender_peak, receiver_peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=100, help="small file, MiB (100)")
    parser.add_argument("--large", type=int, default=4096, help="large file, MiB (4096)")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the files")
    ns = parser.parse_args()
    if not 0 < ns.small <= ns.large:
        parser.error("need 0 < --small <= --large")
    with tempfile.TemporaryDirectory(dir=ns.dir, prefix="ferry-bench-memory-") as tmp:
        root = Path(tmp)
        need = 2 * ns.large * MIB + 512 * MIB  # source + copy + slack
        free = shutil.disk_usage(root).free
        if free < need:
            sys.exit(f"need {need / 2**30:.1f} GiB free in {root}, have {free / 2**30:.1f}")
        broker, address = start_broker(root / "broker")
        peaks: dict[int, tuple[int, int]] = {}
        try:
            for mib in (ns.small, ns.large):
                src = root / f"src-{mib}.bin"
                make_random_file(src, mib * MIB)
                peaks[mib] = measure(src, root / f"dest-{mib}", address)
                shutil.rmtree(root / f"dest-{mib}")
                src.unlink()
                s, r = peaks[mib]
                print(
                    f"{mib:6d} MiB: sender {s / MIB:6.1f} MiB  receiver {r / MIB:6.1f} MiB peak RSS"
                )
        finally:
            broker.terminate()
            broker.wait(timeout=15)
    (s_small, r_small), (s_large, r_large) = peaks[ns.small], peaks[ns.large]
    print(
        f"peak RSS {ns.large} MiB / {ns.small} MiB: sender {s_large / s_small:.2f}, "
        f"receiver {r_large / r_small:.2f} (aim ~1.0)"
    )


if __name__ == "__main__":
    main()
