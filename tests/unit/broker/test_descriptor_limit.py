"""`ferry serve` raises its open-files limit to the hard one, and says when even that is
short of what its settings let it hold (each connection is a descriptor; many hosts start a
process with a soft limit of 1,024, far below --max-connections)."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import logging, resource, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
resource.setrlimit(resource.RLIMIT_NOFILE, (256, int(sys.argv[1])))
from ferry.broker.config import BrokerConfig
from ferry.broker.server import raise_descriptor_limit
limit = raise_descriptor_limit(BrokerConfig(max_connections=int(sys.argv[2])))
print("limit", limit, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def _run(hard: int, max_connections: int) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", CODE, str(hard), str(max_connections)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.splitlines()


def test_the_soft_limit_is_raised_to_the_hard_one() -> None:
    lines = _run(hard=4096, max_connections=1000)  # 1000 + 1024 (responder) + 256 < 4096
    assert lines == ["limit 4096 4096"]


def test_a_hard_limit_short_of_the_settings_is_warned_of() -> None:
    lines = _run(hard=2048, max_connections=20_000)
    assert lines[-1] == "limit 2048 2048"
    assert len(lines) == 2
    assert "open-files limit 2048 is below" in lines[0]
    assert "--max-connections" in lines[0]
