"""What a resume costs: kill -9 the receiver at about half, rerun it, count the bytes.

    python bench/resume.py [--size MiB] [--at FRACTION] [--runs N] [--dir DIR]

Makes a random file (default 1 GiB), starts a real broker and a real `ferry send`, and
runs `ferry receive --json` with its own XDG_STATE_HOME. While it runs, the receiver's
progress is read from the disk: the allocated blocks (``st_blocks``) of the hidden
``.NAME.SESSION.ferry-part`` file, which is sparse until chunks are written at their
offsets. When that reaches --at of the file (default 0.5) the receiver gets SIGKILL; the
identical command (same code, --dest and XDG_STATE_HOME) is then run again while the
sender stays up, to completion.

Prints the second run's bytes_resumed and bytes_transferred, the sender's
bytes_transferred over both attempts, and extra = sender total - file size, as a share
of the file and of what was left after the resume (aim: <= 1% of the remaining half).
The received file is compared with the source byte for byte.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.baseline_copy import make_random_file
from bench.transfer import ferry_env, receive_args, start_broker, start_sender

MIB = 1 << 20


def part_bytes(dest: Path) -> int:
    """Bytes allocated to the receiver's hidden part files in ``dest`` (0 if none)."""
    total = 0
    for part in dest.glob(".*.ferry-part"):
        try:
            total += part.stat().st_blocks * 512
        except FileNotFoundError:  # just renamed into place
            continue
    return total


def _last_json(text: str) -> dict[str, Any]:
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError("no JSON output")
    value = json.loads(lines[-1])
    assert isinstance(value, dict)
    return value


@dataclass(frozen=True)
class Result:
    size: int
    at_kill: int  # part-file bytes when the receiver was killed
    resumed: int  # bytes_resumed of the second receive
    second: int  # bytes_transferred of the second receive
    sender_total: int  # bytes_transferred of the sender, all attempts

    @property
    def extra(self) -> int:
        return self.sender_total - self.size


def resume_once(root: Path, src: Path, broker: str, at: float, chunk_size: int) -> Result:
    size = src.stat().st_size
    dest = root / "dest"
    state = root / "state"
    dest.mkdir()
    env = ferry_env(broker, XDG_STATE_HOME=str(state))
    sender, code = start_sender(src, env, chunk_size)
    receiver: subprocess.Popen[str] | None = None
    try:
        receiver = subprocess.Popen(
            receive_args(code, dest),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        deadline = time.monotonic() + 600
        at_kill = 0
        while time.monotonic() < deadline:
            at_kill = part_bytes(dest)
            if at_kill >= at * size:
                break
            if receiver.poll() is not None:
                raise RuntimeError(
                    f"receiver exited ({receiver.returncode}) at {at_kill} bytes, before the kill"
                )
            time.sleep(0.005)
        else:
            raise TimeoutError("the receiver never got to the kill point")
        receiver.send_signal(signal.SIGKILL)
        receiver.wait()
        at_kill = part_bytes(dest)

        done = subprocess.run(
            receive_args(code, dest),
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"second ferry receive failed: {done.stderr.strip()}")
        last = _last_json(done.stdout)
        out, _ = sender.communicate(timeout=120)
        if sender.returncode != 0:
            raise RuntimeError(f"ferry send exited with {sender.returncode}")
        sent = _last_json(out)
        if not filecmp.cmp(src, dest / src.name, shallow=False):
            raise RuntimeError("the resumed copy differs from the source")
        leftovers = [p.name for p in dest.iterdir() if p.name != src.name]
        if leftovers:
            print(f"  note: left in --dest after completion: {leftovers}")
        return Result(
            size,
            at_kill,
            int(last["bytes_resumed"]),
            int(last["bytes_transferred"]),
            int(sent["bytes_transferred"]),
        )
    finally:
        for proc in (receiver, sender):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="file size in MiB (default 1024)")
    parser.add_argument("--at", type=float, default=0.5, help="kill at this fraction (0.5)")
    parser.add_argument("--runs", type=int, default=1, help="kill-and-resume runs (default 1)")
    parser.add_argument("--chunk-size", type=int, default=1 << 20)
    parser.add_argument("--dir", type=Path, default=None, help="where to put the files")
    ns = parser.parse_args()
    if ns.size <= 0 or ns.runs <= 0 or not 0 < ns.at < 1:
        parser.error("--size and --runs must be positive, --at in (0, 1)")
    size = ns.size * MIB
    results: list[Result] = []
    with tempfile.TemporaryDirectory(dir=ns.dir, prefix="ferry-bench-resume-") as tmp:
        root = Path(tmp)
        src = root / "src.bin"
        make_random_file(src, size)
        broker, address = start_broker(root / "broker")
        try:
            for run in range(ns.runs):
                run_dir = root / f"run-{run}"
                run_dir.mkdir()
                r = resume_once(run_dir, src, address, ns.at, ns.chunk_size)
                results.append(r)
                left = size - r.resumed
                print(
                    f"run {run + 1}: killed at {r.at_kill / size:.1%} on disk; "
                    f"rerun resumed {r.resumed:,} B ({r.resumed / size:.1%}), "
                    f"moved {r.second:,} B (left: {left:,}); "
                    f"sender sent {r.sender_total:,} B in all; "
                    f"extra {r.extra:,} B = {r.extra / size:.2%} of the file, "
                    f"{r.extra / (size / 2):.2%} of half, "
                    f"{r.extra / left if left else 0:.2%} of what was left",
                    flush=True,
                )
        finally:
            broker.terminate()
            broker.wait(timeout=15)
    extra = statistics.median(r.extra for r in results)
    print(
        f"\n{ns.size} MiB, kill at {ns.at:.0%}, {ns.runs} run(s), median extra "
        f"{extra:,.0f} B = {extra / size:.2%} of the file, {extra / (size / 2):.2%} of the "
        "remaining half (aim <= 1%); every resumed copy matched the source byte for byte"
    )


if __name__ == "__main__":
    main()
