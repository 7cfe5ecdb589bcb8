"""A kill -9 campaign: does every kill end in a verified, confirmed file?

    python bench/kill_campaign.py [--trials N] [--size 16M] [--seed N] [--out FILE]
                                  [--scenario S] [--moment M] [--bound S] [--dir DIR]

Each trial (tests/support/campaign.py) starts a real broker on 127.0.0.1, a real
`ferry send --json` and a real `ferry receive --json` (each with its own state folder),
SIGKILLs a random non-empty set of {sender, receiver, broker} at a random delay or at an
event (the receiver's offer line, its first or half of its journalled chunks, the final
file name appearing in DEST -- the completion window -- or the receiver's completion line),
reruns exactly what was killed and waits for both sides' completion. Besides plain kills:
"broker-moved" (the broker comes back with its data on a new port, the clients are rerun
against it) and "lost-state" (the broker's data folder is deleted; the sender must offer
anew and the receiver gets the new code). The first three trials are always a
completion-window kill of the receiver, a broker-moved and a lost-state trial.

Prints each trial as it ends, then the outcome counts (ok / corrupt / lost / extra-rerun /
dirty) overall, by scenario, by victim set and by moment, and writes each trial's record
(victims, moment, exit codes, last stderr lines, times) as one JSON line to --out (default
bench/out/campaign.json). The folders of trials that did not end ok are kept (their path is
printed); the others are removed as the campaign goes. Replay a campaign with its --seed:
the same trials are planned (their timing, and so what they hit, still varies).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Clients offer their peers loopback only (as the tests do): set before anything starts.
os.environ["FERRY_ADDRESSES"] = "127.0.0.1"

from tests.support.campaign import (
    MOMENTS,
    SCENARIOS,
    TrialResult,
    required_plans,
    run_trial,
    summarize,
)
from tests.support.files import random_file

DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "campaign.json"


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        value = int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 16M)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("the size must be positive")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200, help="number of trials (200)")
    parser.add_argument("--size", type=_size, default=16 << 20, help="file size (16M)")
    parser.add_argument("--seed", default=None, help="campaign seed (default: random)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON lines output")
    parser.add_argument("--scenario", choices=SCENARIOS, help="only this scenario")
    parser.add_argument("--moment", choices=MOMENTS, help="only this moment")
    parser.add_argument("--bound", type=float, default=90.0, help="seconds one trial may take (90)")
    parser.add_argument("--dir", type=Path, default=None, help="where trials run")
    ns = parser.parse_args()
    if ns.trials <= 0 or ns.bound <= 0:
        parser.error("--trials and --bound must be positive")
    seed = ns.seed or str(secrets.randbits(32))
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    if ns.dir:
        Path(ns.dir).mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="ferry-campaign-", dir=ns.dir))
    source = random_file(root / "source" / "source.bin", ns.size)
    required = [] if ns.scenario or ns.moment else required_plans()
    print(
        f"{ns.trials} trials of {ns.size / (1 << 20):g} MiB, seed {seed}, in {root}; "
        f"records to {ns.out}",
        flush=True,
    )
    results: list[TrialResult] = []
    started = time.monotonic()
    try:
        with ns.out.open("w") as out:
            for index in range(ns.trials):
                pinned = required[index] if index < len(required) else {}
                if ns.scenario:
                    pinned = {**pinned, "scenario": ns.scenario}
                if ns.moment:
                    pinned = {**pinned, "moment": ns.moment}
                trial_root = root / f"trial-{index}"
                result = run_trial(
                    trial_root,
                    random.Random(f"{seed}:{index}"),
                    ns.size,
                    index=index,
                    seed=seed,
                    source=source,
                    bound_s=ns.bound,
                    **pinned,
                )
                results.append(result)
                out.write(json.dumps(result.record()) + "\n")
                out.flush()
                print(result.line(), flush=True)
                if result.outcome == "ok":
                    shutil.rmtree(trial_root, ignore_errors=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    elapsed = time.monotonic() - started
    print(f"\n{len(results)} trials in {elapsed:.0f} s, seed {seed}\n")
    print(summarize(results))
    bad = [r for r in results if r.outcome != "ok"]
    if bad:
        print("Not ok (the failing process and its last stderr line):")
        for r in bad:
            print(f"  {r.line()}")
            seen = f"; broker then: {r.broker_view}" if r.broker_view else ""
            print(f"      DEST at the kill: {r.dest_at_kill}{seen}")
            for run in r.runs:
                if run.rc not in (0, None) and not (run.killed or run.stopped):
                    last = run.stderr_tail[-1] if run.stderr_tail else ""
                    print(f"      {run.role}#{run.attempt} ({run.why}) rc {run.rc}: {last}")
        print(f"\ntheir folders are kept under {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
