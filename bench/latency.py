"""How long a tiny transfer takes once the receiver starts, and where the time goes.

    python bench/latency.py [--size BYTES] [--runs N] [--tls] [--against DIR] [--wormhole]

For each run a real `ferry send --json` is started and waits (its code printed) before the
clock starts; then `ferry receive CODE --yes --json` is started and timed to its
completion line and to its exit. Both include the Python start-up and imports: that is
what a user waits for (aim: <= 0.2 s). Medians of --runs (default 10) of a --size byte
file (default 1 KiB).

With --tls this tree's broker serves TLS (a certificate for 127.0.0.1 from a CA made for the
run, examples/demo_ca.py) and its clients reach it at grpcs:// with --broker-ca, as a real
deployment would; DIR's broker (--against) stays as that code has it.

With --against DIR (another checkout of Ferry, such as a `git worktree` of an earlier commit),
the same is measured for DIR's code in the same run, alternating with this tree's run by run
(each with a broker of its own code), and the difference of the medians is printed: what a
change added to a tiny transfer, with the machine's drift shared by both.

Then, separately: the wall time of ``python -c "import ferry.cli.main"`` against
``python -c pass`` (medians), and the 10 slowest imports by ``-X importtime`` (self and
cumulative), so the start-up share is visible.

With --wormhole the same is measured for magic-wormhole (bench/wormhole.py's venv,
mailbox and relay on 127.0.0.1): `wormhole send` waits, `wormhole receive --accept-file`
is timed to its "Received file written to" line and to its exit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from demo_ca import make_broker_certificate

from bench.transfer import ferry_env, receive_args, start_broker, start_sender
from bench.wormhole import (
    DEFAULT_VENV,
    ensure_venv,
    wormhole_receive,
    wormhole_sender,
    wormhole_servers,
)


def code_env(checkout: Path | None) -> dict[str, str]:
    """Extra environment that runs ``checkout``'s code (None: this tree's, as installed)."""
    if checkout is None:
        return {}
    roots = [checkout / "proto", checkout / "services", checkout / "clients", checkout]
    return {"PYTHONPATH": os.pathsep.join(str(r.resolve()) for r in roots)}


def ferry_latency(
    src: Path, dest: Path, broker: str, extra: dict[str, str] | None = None
) -> tuple[float, float]:
    """(seconds to the completion line, seconds to exit) of one `ferry receive`."""
    env = ferry_env(broker, **(extra or {}))
    sender, code = start_sender(src, env)
    receiver: subprocess.Popen[str] | None = None
    try:
        started = time.perf_counter()
        receiver = subprocess.Popen(
            receive_args(code, dest), stdout=subprocess.PIPE, text=True, env=env
        )
        assert receiver.stdout is not None
        to_line = None
        for line in receiver.stdout:  # ends at the receiver's exit (bounded by wait below)
            if json.loads(line).get("event") == "completed":
                to_line = time.perf_counter() - started
        rc = receiver.wait(timeout=60)
        to_exit = time.perf_counter() - started
        if rc != 0 or to_line is None:
            raise RuntimeError(f"ferry receive exited with {rc} without completing")
        if sender.wait(timeout=60) != 0:
            raise RuntimeError("ferry send failed")
    finally:
        for proc in (receiver, sender):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    return to_line, to_exit


def wall(cmd: list[str], runs: int) -> float:
    """Median wall seconds of running ``cmd``."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(cmd, check=True, timeout=60)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def import_times(module: str) -> list[tuple[int, int, str]]:
    """(self µs, cumulative µs, name) of every import of ``module``, per -X importtime."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative, name = line.removeprefix("import time:").split("|", 2)
        rows.append((int(self_us), int(cumulative), name.strip()))
    return rows


def _report(what: str, pairs: list[tuple[float, float]], first: str) -> None:
    a = statistics.median(p[0] for p in pairs)
    b = statistics.median(p[1] for p in pairs)
    print(f"{what}: median of {len(pairs)}: {first} {a:.3f} s, exit {b:.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="file size in bytes (1024)")
    parser.add_argument("--runs", type=int, default=10, help="runs (default 10)")
    parser.add_argument(
        "--against", type=Path, help="another Ferry checkout to measure in the same run"
    )
    parser.add_argument("--tls", action="store_true", help="this tree's broker on TLS")
    parser.add_argument("--wormhole", action="store_true", help="measure magic-wormhole too")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="wormhole's virtualenv")
    ns = parser.parse_args()
    # Users' installs have their bytecode cached; without it every run compiles Ferry anew
    # (+0.1 s here), and new modules look dearer than they are.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    if ns.size < 0 or ns.runs <= 0:
        parser.error("--runs must be positive, --size not negative")
    with tempfile.TemporaryDirectory(prefix="ferry-bench-latency-") as tmp:
        root = Path(tmp)
        src = root / "small.bin"
        src.write_bytes(os.urandom(ns.size))
        mine: dict[str, str] = {}
        tls_args: list[str] = []
        if ns.tls:
            ca, cert, private = make_broker_certificate(root / "pki", "127.0.0.1")
            tls_args = ["--tls-cert", str(cert), "--tls-key", str(private)]
            mine = {"FERRY_BROKER_CA": str(ca)}
        broker, address = start_broker(root / "broker", *tls_args)
        if ns.tls:
            address = f"grpcs://{address}"
        other_env = code_env(ns.against)
        other = (
            start_broker(root / "other-broker", env={**os.environ, **other_env})
            if ns.against
            else None
        )
        ferry: list[tuple[float, float]] = []
        against: list[tuple[float, float]] = []
        try:
            ferry_latency(src, root / "warm", address, mine)  # warm caches (.pyc, broker)
            if other is not None:
                ferry_latency(src, root / "warm-other", other[1], other_env)
            for run in range(ns.runs):
                ferry.append(ferry_latency(src, root / f"ferry-{run}", address, mine))
                print(
                    f"  ferry run {run + 1}: line {ferry[-1][0]:.3f} s, exit {ferry[-1][1]:.3f} s"
                )
                if other is not None:
                    against.append(ferry_latency(src, root / f"other-{run}", other[1], other_env))
                    print(
                        f"  --against run {run + 1}: line {against[-1][0]:.3f} s,"
                        f" exit {against[-1][1]:.3f} s"
                    )
        finally:
            for proc in (broker, other[0] if other else None):
                if proc is not None:
                    proc.terminate()
                    proc.wait(timeout=15)
        worm: list[tuple[float, float]] = []
        if ns.wormhole:
            with wormhole_servers(ensure_venv(ns.venv), root / "wormhole-servers") as servers:
                for run in range(ns.runs + 1):
                    with wormhole_sender(servers, src) as code:
                        got = wormhole_receive(servers, code, root / f"wh-{run}", timeout=60)
                    if run:  # the first one warms up
                        worm.append((got.to_done, got.wall))
                        print(
                            f"  wormhole run {run}: line {got.to_done:.3f} s, exit {got.wall:.3f} s"
                            f" ({got.route})"
                        )

    py = [sys.executable]
    bare = wall([*py, "-c", "pass"], ns.runs)
    imported = wall([*py, "-c", "import ferry.cli.main"], ns.runs)
    rows = import_times("ferry.cli.main")

    print(f"\n{ns.size} B transfer, sender already waiting, timed from starting the receiver:")
    _report("  ferry receive   ", ferry, "completion line")
    if against:
        _report("  --against       ", against, "completion line")
        added = statistics.median(p[0] for p in ferry) - statistics.median(p[0] for p in against)
        print(f"  -> this tree adds {added * 1000:+.0f} ms to the completion line")
    if worm:
        _report("  wormhole receive", worm, "'Received file' line")
    print("  (aim: ferry <= 0.2 s; wormhole measured 0.45 s before)")
    print(f"python -c pass: {bare:.3f} s; python -c 'import ferry.cli.main': {imported:.3f} s")
    print(f"  -> importing the CLI costs {imported - bare:.3f} s of each run")
    key: Callable[[tuple[int, int, str]], int]
    for title, key in (("self", lambda r: r[0]), ("cumulative", lambda r: r[1])):
        print(f"10 slowest imports by {title} time (-X importtime, one run, ms self / cumulative):")
        for self_us, cumulative, name in sorted(rows, key=key, reverse=True)[:10]:
            print(f"  {self_us / 1000:7.1f} {cumulative / 1000:7.1f}  {name}")


if __name__ == "__main__":
    main()
