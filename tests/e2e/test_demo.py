"""The README's main job, as a newcomer runs it: examples/demo.py must keep working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.timeout(120)]

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.py"


def test_demo_moves_a_file_through_a_real_broker() -> None:
    done = subprocess.run(
        [sys.executable, str(DEMO), "--size", "8"],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "byte-for-byte identical: True" in done.stdout
    assert "Code: " in done.stdout
    assert "Received 1 file(s), 8.0 MiB" in done.stdout
    # Its broker speaks TLS, and its clients trust the demo's own CA.
    assert "--tls-cert broker.crt --tls-key broker.key" in done.stdout
    assert "listening on grpcs://127.0.0.1:" in done.stdout
    assert "--broker-ca ca.pem" in done.stdout
