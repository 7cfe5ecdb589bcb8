"""A bounded kill -9 campaign: every kill must end in a verified, confirmed file.

Each trial (tests/support/campaign.py) runs a real broker, `ferry send` and `ferry receive`,
SIGKILLs a random set of them at a random or event-triggered moment, reruns what was
killed, and checks both sides' completion and the received bytes. Every run contains a
kill in the completion window, a broker that comes back on a new port, and a broker that
lost its data folder; the other trials are random. 8-24 MiB files.

The seed is random and printed on failure; replay with FERRY_CAMPAIGN_SEED=<seed>, and
run only trial N of it with FERRY_CAMPAIGN_ONLY=N.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import BrokerFactory
from tests.support.campaign import TrialResult, required_plans, run_trial
from tests.support.processes import BrokerProcess

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

TRIALS = 10
BOUND_S = 45.0  # one trial, reruns included (a receiver waits 30 s for a vanished sender)
BUDGET_S = 150.0  # no new trial starts after this (only reached when trials hang)
MIB = 1 << 20


def test_every_kill_ends_in_a_verified_confirmed_file(
    tmp_path: Path, broker_factory: BrokerFactory
) -> None:
    seed = os.environ.get("FERRY_CAMPAIGN_SEED") or str(secrets.randbits(32))
    only = os.environ.get("FERRY_CAMPAIGN_ONLY")
    indices = [int(only)] if only else list(range(TRIALS))
    required = required_plans()
    assert len(required) <= TRIALS

    def start_broker(data_dir: Path) -> BrokerProcess:
        return broker_factory(name=str(data_dir.relative_to(tmp_path)))

    print(f"kill campaign seed {seed}")
    started = time.monotonic()
    results: list[TrialResult] = []
    skipped: list[int] = []
    for index in indices:
        if time.monotonic() - started > BUDGET_S:
            skipped.append(index)
            continue
        size = random.Random(f"{seed}:{index}:size").randrange(8, 25) * MIB
        pinned = required[index] if index < len(required) else {}
        root = tmp_path / f"trial-{index}"
        result = run_trial(
            root,
            random.Random(f"{seed}:{index}"),
            size,
            index=index,
            seed=seed,
            start_broker=start_broker,
            bound_s=BOUND_S,
            **pinned,
        )
        results.append(result)
        print(result.line())
        if result.outcome == "ok":
            shutil.rmtree(root, ignore_errors=True)  # 2 x 24 MiB each: keep only failures

    bad = [r for r in results if r.outcome != "ok"]
    replay = f"replay: FERRY_CAMPAIGN_SEED={seed} (one trial: FERRY_CAMPAIGN_ONLY=N)"
    summary = "\n".join(r.line() for r in results)
    if bad:
        pytest.fail(
            f"{len(bad)} of {len(results)} trials did not end ok; {replay}\n{summary}\n\n"
            + "\n\n".join(r.explain() for r in bad),
            pytrace=False,
        )
    assert not skipped, f"trials {skipped} not run: over the {BUDGET_S} s budget; {replay}"
    if only is None:  # the campaign covered the cases it promises
        assert any(r.moment == "final-name" and "receiver" in r.killed for r in results), summary
        assert any(r.scenario == "broker-moved" for r in results), summary
        assert any(r.scenario == "lost-state" for r in results), summary
